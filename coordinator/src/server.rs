//! The QUIC control server: one session per agent connection, on one bidirectional stream.
//!
//! Pipeline of a session:
//!
//! ```text
//! accept connection ─> accept stream ─> read Hello (within hello_timeout)
//!   ─> Service::hello (join or authenticate; attach to the hub)
//!        refused: write Refused, finish, close(REFUSED)
//!        until accepted, QUIC datagrams are read and dropped (counted: unauthenticated)
//!   ─> relay route for the node's key (crate::relay), dropped with the session
//!   ─> write Welcome, FullMap
//!   ─> loop: agent messages (Service::on_agent_message, in dispatch.rs), rate-capped
//!            hub queue (deltas, Revoked + close), each write under write_timeout
//!      beside it: QUIC datagrams from the agent ─> Relay::forward
//!   ─> close(code) with one log line; Service::session_closed
//! ```
//!
//! Whatever one agent sends (malformed, oversized, out-of-order or too many messages) ends that
//! session only, with a close code from [`close_code`] and an `info` line; it cannot panic the
//! process or stall other sessions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_proto::control::{
    encode, ClientMessage, CodecError, Decoder, ServerMessage, MAX_CLIENT_MESSAGE,
};
use quinn::crypto::rustls::QuicServerConfig;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at};
use tracing::{info, warn, Instrument};

use crate::dispatch::{SessionFault, SessionRef};
use crate::handlers::ApiError;
use crate::hub::{CloseReason, Outbound};
use crate::identity::Identity;
use crate::ratelimit::TokenBucket;
use crate::relay::Relay;
use crate::service::{Service, Session};

pub use meshlink_proto::control::ALPN;

/// How long the coordinator waits for the agent to receive its last message (`Refused`,
/// `Revoked`) before closing the connection.
const LINGER: Duration = Duration::from_secs(2);

/// QUIC application close codes the coordinator uses, for the agent's logs and decisions.
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
    /// Connections at once; more are refused.
    pub max_connections: usize,
    /// Bytes per second one node may send through the relay (see [`crate::relay`]).
    pub relay_rate: u64,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(10),
            message_rate: 20,
            message_burst: 100,
            session_queue: 256,
            max_connections: 10_000,
            relay_rate: crate::relay::DEFAULT_RATE,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            workload_lease: meshlink_proto::workload::DEFAULT_LEASE,
            workload_grace: meshlink_proto::workload::DEFAULT_GRACE,
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

/// Bytes of QUIC datagrams received on one connection and not yet read by its session (quinn
/// drops the oldest beyond it). About 100 relay frames: the session reads them as they come.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 128 * 1024;
/// Bytes of QUIC datagrams queued to one connection and not yet sent (beyond it the relay
/// drops new frames: `congested`). At 100 Mbit/s, 20 ms of queue.
pub const DATAGRAM_SEND_BUFFER: usize = 256 * 1024;

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
) -> Result<quinn::Endpoint, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
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
/// endpoint and waits a little for sessions to end. With `relay`, sessions relay datagrams.
pub async fn run(
    endpoint: quinn::Endpoint,
    service: Arc<Service>,
    limits: Limits,
    relay: Option<Arc<Relay>>,
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
        if sessions.len() >= limits.max_connections {
            tracing::debug!(remote = %incoming.remote_address(), "connection refused: at max_connections");
            incoming.refuse();
            continue;
        }
        let span = tracing::info_span!("session", remote = %incoming.remote_address(), node = tracing::field::Empty);
        sessions.spawn(
            connection(incoming, service.clone(), limits.clone(), relay.clone()).instrument(span),
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

/// How a session ended: the close code, a short reason for the agent, a line for the log.
struct End {
    code: u32,
    peer: &'static str,
    log: String,
}

impl End {
    fn new(code: u32, peer: &'static str, log: impl Into<String>) -> Self {
        End {
            code,
            peer,
            log: log.into(),
        }
    }

    fn protocol(log: impl Into<String>) -> Self {
        End::new(close_code::PROTOCOL, "protocol error", log)
    }

    fn read(fail: ReadFail) -> Self {
        match fail {
            ReadFail::Codec(CodecError::TooLarge { len, max }) => {
                End::protocol(format!("message of {len} bytes is over the limit of {max}"))
            }
            ReadFail::Codec(CodecError::Malformed(e)) => {
                End::protocol(format!("malformed message: {e}"))
            }
            ReadFail::RateLimited => End::new(
                close_code::RATE_LIMITED,
                "too many messages",
                "too many messages",
            ),
            ReadFail::Finished => {
                End::new(close_code::DONE, "done", "the agent finished its stream")
            }
            ReadFail::Transport(e) => {
                End::new(close_code::DONE, "done", format!("connection lost: {e}"))
            }
        }
    }

    fn api(e: &ApiError) -> Self {
        match e {
            ApiError::Invalid(m) => End::protocol(m.clone()),
            ApiError::Internal(_) => {
                End::new(close_code::INTERNAL, "internal error", e.to_string())
            }
            other => End::new(close_code::REFUSED, "refused", other.to_string()),
        }
    }

    fn hub(reason: CloseReason) -> Self {
        match reason {
            CloseReason::Replaced => End::new(
                close_code::REPLACED,
                "replaced",
                "a newer session of the node replaced this one",
            ),
            CloseReason::Revoked => {
                End::new(close_code::REVOKED, "revoked", "the node was revoked")
            }
            CloseReason::Deleted => {
                End::new(close_code::REVOKED, "deleted", "the node was deleted")
            }
        }
    }
}

async fn connection(
    incoming: quinn::Incoming,
    service: Arc<Service>,
    limits: Limits,
    relay: Option<Arc<Relay>>,
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
    let end = drive(&conn, &service, &limits, relay.as_ref(), deadline).await;
    info!(code = end.code, "session closed: {}", end.log);
    conn.close(end.code.into(), end.peer.as_bytes());
}

async fn drive(
    conn: &quinn::Connection,
    service: &Arc<Service>,
    limits: &Limits,
    relay: Option<&Arc<Relay>>,
    deadline: tokio::time::Instant,
) -> End {
    let opened = not_relaying(conn, relay, timeout_at(deadline, conn.accept_bi())).await;
    let (mut send, recv) = match opened {
        Err(_) => {
            return End::new(
                close_code::HELLO_TIMEOUT,
                "no hello in time",
                "no stream opened in time",
            )
        }
        Ok(Err(e)) => {
            return End::new(
                close_code::DONE,
                "done",
                format!("connection lost before the hello: {e}"),
            )
        }
        Ok(Ok(streams)) => streams,
    };
    let mut reader = Reader::new(recv, limits);
    let hello = not_relaying(conn, relay, timeout_at(deadline, reader.next())).await;
    let hello = match hello {
        Err(_) => {
            return End::new(
                close_code::HELLO_TIMEOUT,
                "no hello in time",
                "no hello in time",
            )
        }
        Ok(Err(fail)) => return End::read(fail),
        Ok(Ok(ClientMessage::Hello(hello))) => hello,
        Ok(Ok(_)) => return End::protocol("the first message was not a hello"),
    };
    let accepted = not_relaying(
        conn,
        relay,
        service.hello(&hello, conn.remote_address().ip()),
    )
    .await;
    let mut session = match accepted {
        Ok(session) => session,
        Err(e) => {
            // A failure of the coordinator itself (its database) is not the node's fault: it
            // is told to come back, not turned away for good.
            let (frame, code, what) = if let ApiError::Internal(inner) = &e {
                warn!("hello failed: {inner}");
                let frame = encode(&ServerMessage::Unavailable {
                    reason: e.public_message(),
                });
                (frame, close_code::UNAVAILABLE, "unavailable")
            } else {
                let frame = encode(&ServerMessage::Refused {
                    reason: e.public_message(),
                });
                (frame, close_code::REFUSED, "refused")
            };
            let last_words = async {
                let _ = timeout(limits.write_timeout, send.write_all(&frame)).await;
                let _ = send.finish();
                let _ = timeout(LINGER, send.stopped()).await;
            };
            not_relaying(conn, relay, last_words).await;
            return End::new(code, what, format!("hello not served: {e}"));
        }
    };
    tracing::Span::current().record("node", session.node);
    info!(
        name = %session.name,
        network = %session.network,
        joined = session.joined,
        "session open"
    );
    // Registered before the welcome is written, so that a peer told of this node can reach
    // it at once; removed when the session ends.
    let relaying = relay.map(|relay| {
        let route = relay.register(
            hello.public_key,
            &session.network,
            session.attached.serial,
            conn.clone(),
        );
        let source = relay.source(hello.public_key, &session.network, Instant::now());
        (relay, route, source)
    });
    let control = session_loop(conn, &mut send, &mut reader, service, &mut session, limits);
    let end = match relaying {
        Some((relay, _route, source)) => {
            tokio::select! {
                end = control => end,
                never = relay_frames(conn, relay, source) => match never {},
            }
        }
        None => control.await,
    };
    service
        .session_closed(&session.network, session.node, session.attached.serial)
        .await;
    end
}

/// Runs `work` while dropping (and counting) the datagrams the connection receives: before
/// its hello is accepted, a connection is no source of relayed frames.
async fn not_relaying<T>(
    conn: &quinn::Connection,
    relay: Option<&Arc<Relay>>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let Some(relay) = relay else {
        return work.await;
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            datagram = conn.read_datagram() => match datagram {
                Ok(_) => relay.count_unauthenticated(),
                // The connection is gone: `work` ends with it.
                Err(_) => return work.await,
            },
        }
    }
}

/// Relays the session's datagrams for as long as the session lasts (never returns: the
/// session's end is the control loop's to say).
async fn relay_frames(
    conn: &quinn::Connection,
    relay: &Relay,
    mut source: crate::relay::Source,
) -> std::convert::Infallible {
    loop {
        match conn.read_datagram().await {
            Ok(datagram) => {
                // Dropped frames are counted by the relay; none is logged.
                let _ = relay.forward(&mut source, datagram.into(), Instant::now());
            }
            Err(_) => std::future::pending().await,
        }
    }
}

async fn session_loop(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    reader: &mut Reader,
    service: &Arc<Service>,
    session: &mut Session,
    limits: &Limits,
) -> End {
    if let Err(end) = write(send, &session.welcome, limits).await {
        return end;
    }
    if let Err(end) = write(send, &session.attached.full_map, limits).await {
        return end;
    }
    loop {
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(msg) => {
                    let from = SessionRef {
                        node: session.node,
                        network: &session.network,
                        remote: conn.remote_address().ip(),
                    };
                    match service.on_agent_message(from, msg).await {
                        Ok(Some(frame)) => {
                            if let Err(end) = write(send, &frame, limits).await {
                                return end;
                            }
                        }
                        Ok(None) => {}
                        Err(SessionFault::Api(e)) => return End::api(&e),
                        Err(SessionFault::NetworkGone) => {
                            return End::new(close_code::INTERNAL, "internal error", "the network is gone")
                        }
                        Err(SessionFault::SecondHello) => return End::protocol("a second hello"),
                    }
                }
                Err(fail) => return End::read(fail),
            },
            out = session.attached.rx.recv() => match out {
                Some(Outbound::Frame(frame)) => {
                    if let Err(end) = write(send, &frame, limits).await {
                        return end;
                    }
                }
                Some(Outbound::Close(reason)) => {
                    let _ = send.finish();
                    let _ = timeout(LINGER, send.stopped()).await;
                    return End::hub(reason);
                }
                None => return End::new(close_code::LAGGING, "too slow", "dropped: its queue was full"),
            },
        }
    }
}

async fn write(send: &mut quinn::SendStream, frame: &[u8], limits: &Limits) -> Result<(), End> {
    match timeout(limits.write_timeout, send.write_all(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::new(
            close_code::DONE,
            "done",
            format!("connection lost: {e}"),
        )),
        Err(_) => Err(End::new(
            close_code::LAGGING,
            "too slow",
            "a write timed out",
        )),
    }
}

enum ReadFail {
    Codec(CodecError),
    RateLimited,
    Finished,
    Transport(String),
}

/// Reads framed client messages from the stream, enforcing the size cap and the rate cap.
struct Reader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    buf: Box<[u8]>,
    bucket: TokenBucket,
}

impl Reader {
    fn new(recv: quinn::RecvStream, limits: &Limits) -> Self {
        Reader {
            recv,
            decoder: Decoder::new(MAX_CLIENT_MESSAGE),
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
            bucket: TokenBucket::new(limits.message_rate, limits.message_burst, Instant::now()),
        }
    }

    /// The next message. Cancel-safe: bytes are only taken from the stream and pushed into
    /// the decoder together, with no await in between.
    async fn next(&mut self) -> Result<ClientMessage, ReadFail> {
        loop {
            if let Some(msg) = self
                .decoder
                .decode::<ClientMessage>()
                .map_err(ReadFail::Codec)?
            {
                if !self.bucket.allow(Instant::now()) {
                    return Err(ReadFail::RateLimited);
                }
                return Ok(msg);
            }
            match self.recv.read(&mut self.buf).await {
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]).map_err(ReadFail::Codec)?,
                Ok(None) => return Err(ReadFail::Finished),
                Err(e) => return Err(ReadFail::Transport(e.to_string())),
            }
        }
    }
}
