//! The QUIC control server: one session per agent connection, on one bidirectional stream,
//! with relay frames as QUIC datagrams beside it. The session itself (hello, maps, deltas,
//! relay) is `session.rs`'s, shared with the TLS/TCP listener (`tcp.rs`); this file owns the
//! endpoint, its accept loop and `QuicTransport`.
//!
//! ```text
//! Initial from an address not yet validated ─> Retry (no state kept; the client comes back
//!   with the token, proving it receives at that address)
//! validated ─> admit (max_connections, max_unauthenticated and max_unauthenticated_per_ip,
//!   shared with TLS/TCP; refused otherwise) ─> handshake ─> accept stream
//!   (the handshake, the stream and the hello within hello_timeout; datagrams before the hello
//!   dropped) ─> session::serve ─> close(code)
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at};
use tracing::{info, Instrument};

use crate::identity::Identity;
use crate::relay::{Relaying, SessionLink};
use crate::service::Service;
use crate::session::{self, Admission, Connections, End, Transport, LINGER};

pub use meshlink_proto::control::ALPN;
use meshlink_proto::relay::RELAY_ALPN;

/// QUIC application close codes the coordinator uses, for the agent's logs and decisions. A
/// TLS/TCP session carries no code: its agent learns the same from the last message
/// (`Refused`, `Unavailable`, `Revoked`) or the end of the stream, and the code is logged.
pub mod close_code {
    /// The agent finished its stream.
    pub const DONE: u32 = 0;
    /// A malformed, oversized or out-of-order message (such as a second hello).
    pub const PROTOCOL: u32 = 1;
    /// The hello was refused (a `Refused` message was sent first).
    pub const REFUSED: u32 = 2;
    /// The node was revoked or deleted (a `Revoked` message was sent first). Do not reconnect.
    pub const REVOKED: u32 = 3;
    /// A newer session of the same node replaced this one.
    pub const REPLACED: u32 = 4;
    /// The agent did not read fast enough; reconnect for a full map.
    pub const LAGGING: u32 = 5;
    /// The agent sent more messages than allowed.
    pub const RATE_LIMITED: u32 = 6;
    /// No hello arrived in time.
    pub const HELLO_TIMEOUT: u32 = 7;
    /// The coordinator is shutting down; reconnect later.
    pub const SHUTDOWN: u32 = 8;
    /// The coordinator failed; reconnect later.
    pub const INTERNAL: u32 = 9;
    /// The hello could not be served now (an `Unavailable` message was sent first: the
    /// database is away); reconnect later or elsewhere.
    pub const UNAVAILABLE: u32 = 10;
}

/// Limits that protect the coordinator from agents. See `configs/coordinator.example.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time from the first packet to a complete hello.
    pub hello_timeout: Duration,
    /// Messages per second an agent may send on average.
    pub message_rate: u32,
    /// Messages an agent may send at once.
    pub message_burst: u32,
    /// Messages queued for one session before it is dropped as lagging.
    pub session_queue: usize,
    /// Connections at once, QUIC and TLS/TCP together; more are refused.
    pub max_connections: usize,
    /// Connections at once whose hello is not accepted yet, QUIC and TLS/TCP together (they
    /// count in `max_connections` too); more are refused.
    pub max_unauthenticated: usize,
    /// Connections at once whose hello is not accepted yet from one source: an IPv4 address,
    /// or an IPv6 /64.
    pub max_unauthenticated_per_ip: usize,
    /// Bytes per second one node may send through the relay (see [`crate::relay`]).
    pub relay_rate: u64,
    /// Time between two endpoint changes of one node past [`Limits::endpoint_burst`]; a
    /// report within it waits for its end (see [`crate::endpoint_pace`]).
    pub endpoint_interval: Duration,
    /// Endpoint changes one node may make at once.
    pub endpoint_burst: u32,
    /// Time allowed to write one message to an agent.
    pub write_timeout: Duration,
    /// A connection with no traffic for this long is closed (the coordinator pings at a third
    /// of it).
    pub idle_timeout: Duration,
    /// The lease a workload holder gets with each answered heartbeat: a holder cut off from
    /// the coordinator stops answering for its workload addresses this long after its last
    /// answered heartbeat, and a silent holder's workloads fail over after it.
    pub workload_lease: Duration,
    /// How long a former holder forwards packets for a moved workload address to the new
    /// holder (and the new holder accepts what it relays).
    pub workload_grace: Duration,
    /// How long entries of the audit log are kept.
    pub audit_retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(10),
            message_rate: 20,
            message_burst: 100,
            session_queue: 256,
            max_connections: 10_000,
            max_unauthenticated: 1_000,
            max_unauthenticated_per_ip: 32,
            relay_rate: crate::relay::DEFAULT_RATE,
            endpoint_interval: crate::endpoint_pace::DEFAULT_INTERVAL,
            endpoint_burst: crate::endpoint_pace::DEFAULT_BURST,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            workload_lease: meshlink_proto::workload::DEFAULT_LEASE,
            workload_grace: meshlink_proto::workload::DEFAULT_GRACE,
            audit_retention: Duration::from_secs(90 * 86_400),
        }
    }
}

/// Why the QUIC endpoint cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration was refused (a damaged key).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket cannot be bound.
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
}

/// The bounds of a connection's QUIC datagram buffers, the same at every relay.
pub use meshlink_relay::forward::{DATAGRAM_RECEIVE_BUFFER, DATAGRAM_SEND_BUFFER};

/// Binds the QUIC endpoint with the coordinator's identity: TLS 1.3 only, ring, ALPN
/// [`ALPN`], one bidirectional stream per connection; QUIC datagrams (bounded buffers, see
/// [`DATAGRAM_RECEIVE_BUFFER`]) when `relay` is on, none otherwise.
///
/// # Errors
/// [`ServerError`].
pub fn endpoint(
    identity: &Identity,
    listen: SocketAddr,
    limits: &Limits,
    relay: bool,
    relay_sessions: bool,
) -> Result<quinn::Endpoint, ServerError> {
    let quic = QuicServerConfig::try_from(tls_config(identity, relay_sessions)?)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        // Without a receive buffer, quinn offers peers no datagrams at all: an agent's
        // `max_datagram_size()` is `None` and it cannot send any.
        .datagram_receive_buffer_size(relay.then_some(DATAGRAM_RECEIVE_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .keep_alive_interval(Some(limits.idle_timeout / 3))
        .max_idle_timeout(limits.idle_timeout.try_into().ok());
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    // The stateless-reset key is derived from the identity, so it survives restarts, and
    // connection IDs are plain random ones that any process accepts as its own (quinn's
    // default signs them with a key of the process, and drops, without a reset, packets whose
    // ID it cannot validate). So a restarted coordinator answers a packet of a connection of
    // the previous process with a reset the agent accepts: agents learn of the restart from
    // their next packet and reconnect at once, instead of waiting out the idle timeout.
    let mut seed = Sha256::new();
    seed.update(b"meshlink stateless reset v1");
    seed.update(identity.key.secret_der());
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed.finalize());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(|| Box::new(RandomCids));
    // quinn sends at most one reset per 20 ms by default: after a restart, a fleet's
    // keepalives would then wait their turn for seconds. A reset is always smaller than the
    // packet that drew it, so a shorter interval amplifies nothing.
    endpoint_config.min_reset_interval(RESET_INTERVAL);
    let bind = |source| ServerError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| bind(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime).map_err(bind)
}

/// The TLS configuration of both transports: the coordinator's identity, TLS 1.3 only, ring,
/// ALPN [`ALPN`], and with `relay_sessions` also [`RELAY_ALPN`] (a coordinator of several
/// serves relay sessions on its own port: [`Relaying::port`]).
///
/// # Errors
/// [`ServerError::Tls`].
pub fn tls_config(
    identity: &Identity,
    relay_sessions: bool,
) -> Result<rustls::ServerConfig, ServerError> {
    let mut tls =
        meshlink_tls::server_config(identity.cert.clone(), identity.key.clone_key(), ALPN)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    if relay_sessions {
        tls.alpn_protocols.push(RELAY_ALPN.to_vec());
    }
    Ok(tls)
}

/// Connection IDs of [`CID_LEN`] random bytes, valid for any coordinator process (see
/// [`endpoint`]).
struct RandomCids;

/// The length of the coordinator's connection IDs.
const CID_LEN: usize = 8;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The shortest time between two stateless resets (see [`endpoint`]).
const RESET_INTERVAL: Duration = Duration::from_millis(1);

/// Accepts connections until `shutdown` changes (or its sender is dropped), then closes the
/// endpoint and waits a little for sessions to end. With `relaying`'s relay, sessions relay
/// datagrams; with its sessions, connections that chose [`RELAY_ALPN`] are relay sessions.
/// `connections` is shared with the TLS/TCP listener.
pub async fn run(
    endpoint: quinn::Endpoint,
    service: Arc<Service>,
    limits: Limits,
    relaying: Relaying,
    connections: Arc<Connections>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = shutdown.changed() => break,
        };
        while sessions.try_join_next().is_some() {}
        // A source proves it receives at its address before it costs anything: a spoofed
        // address cannot take a place of the caps below, nor draw a handshake's worth of
        // answer at a third party.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let remote = incoming.remote_address();
        let admission = match connections.admit(remote.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::debug!(%remote, "connection refused: {refusal}");
                incoming.refuse();
                continue;
            }
        };
        let span = tracing::info_span!("session", remote = %incoming.remote_address(), transport = "quic", node = tracing::field::Empty);
        sessions.spawn(
            connection(
                incoming,
                service.clone(),
                limits.clone(),
                relaying.clone(),
                admission,
            )
            .instrument(span),
        );
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
    let drained = timeout(Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.abort_all();
    }
}

async fn connection(
    incoming: quinn::Incoming,
    service: Arc<Service>,
    limits: Limits,
    relaying: Relaying,
    admission: Admission,
) {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("connection failed: {e}");
            return;
        }
    };
    // One deadline covers the handshake, the stream and the hello.
    let deadline = tokio::time::Instant::now() + limits.hello_timeout;
    let conn = match timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    let chosen = alpn(&conn);
    if let Some(port) = relaying.port_for(chosen.as_deref()) {
        let Some(Admission {
            slot: _slot,
            before_hello,
        }) = port.admit(conn.remote_address().ip(), admission)
        else {
            conn.close(close_code::DONE.into(), b"too many relay sessions");
            return;
        };
        return port.sessions.serve_quic(conn, deadline, before_hello).await;
    }
    if chosen.as_deref() == Some(RELAY_ALPN) {
        // Offered, but this coordinator decided against serving them (run.rs).
        conn.close(close_code::DONE.into(), b"no relay sessions here");
        return;
    }
    let Admission {
        slot: _slot,
        before_hello,
    } = admission;
    let transport = QuicTransport(conn.clone());
    let relay = relaying.relay.as_ref();
    let opened =
        session::not_relaying(&transport, relay, timeout_at(deadline, conn.accept_bi())).await;
    let end = match opened {
        Ok(Ok((send, recv))) => {
            return session::serve(
                transport,
                recv,
                send,
                &service,
                &limits,
                relay,
                relaying.grants.as_ref(),
                deadline,
                before_hello,
            )
            .await
        }
        Err(_) => End::new(
            close_code::HELLO_TIMEOUT,
            "no hello in time",
            "no stream opened in time",
        ),
        Ok(Err(e)) => End::new(
            close_code::DONE,
            "done",
            format!("connection lost before the hello: {e}"),
        ),
    };
    info!(code = end.code, "session closed: {}", end.log);
    conn.close(end.code.into(), end.peer.as_bytes());
}

/// The protocol a connection's handshake chose.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// A QUIC connection as a session's transport: relay frames are datagrams beside the stream,
/// close codes are QUIC application codes.
struct QuicTransport(quinn::Connection);

impl Transport for QuicTransport {
    type Read = quinn::RecvStream;
    type Write = quinn::SendStream;
    const KIND: crate::telemetry::Transport = crate::telemetry::Transport::Quic;

    fn remote(&self) -> SocketAddr {
        self.0.remote_address()
    }

    fn datagram_link(&self) -> Option<SessionLink> {
        Some(SessionLink::Quic(self.0.clone()))
    }

    async fn datagram(&self) -> Option<Vec<u8>> {
        self.0.read_datagram().await.ok().map(Vec::from)
    }

    fn shutting_down(&self) -> impl Future<Output = ()> + Send {
        // Closing the endpoint ends every read and write of its connections.
        std::future::pending()
    }

    async fn finish(write: &mut quinn::SendStream) {
        let _ = write.finish();
        let _ = timeout(LINGER, write.stopped()).await;
    }

    async fn close(
        self,
        code: u32,
        reason: &'static str,
        _read: quinn::RecvStream,
        _write: quinn::SendStream,
    ) {
        self.0.close(code.into(), reason.as_bytes());
    }
}
