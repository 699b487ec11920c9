//! One agent session, whatever carries it: QUIC (`server.rs`) or TLS over TCP (`tcp.rs`). The
//! transport gives a byte stream (read and write halves) and a `Transport` for the rest; the
//! session logic here is the same for both.
//!
//! Pipeline of a session, once its transport has a stream:
//!
//! ```text
//! read Hello (within hello_timeout of the first packet)
//!   until accepted, relay frames are read and dropped (counted: unauthenticated): QUIC
//!   datagrams beside the stream, relay records of a TLS/TCP stream
//!   ─> Service::hello (credentials checked with reads, then join or authenticate and attach
//!      to the hub under the write lock)
//!        refused: write Refused (or Unavailable), finish, close(REFUSED)
//!        accepted: the connection leaves the caps before the hello ([`Connections`])
//!   ─> relay route for the node's key (crate::relay), dropped with the session: the QUIC
//!      connection, or a queue of records this session's writer drains
//!   ─> write Welcome, FullMap
//!   ─> loop: agent messages (Service::on_agent_message, in dispatch.rs), rate-capped
//!            relay records from the agent (TLS/TCP) ─> Relay::forward
//!            hub queue (deltas, Revoked + close), each write under write_timeout
//!            relay records to the agent (TLS/TCP), a batch per write
//!      beside it: QUIC datagrams from the agent ─> Relay::forward
//!   ─> close(code) with one log line; Service::session_closed
//! ```
//!
//! Whatever one agent sends (malformed, oversized, out-of-order or too many messages) ends that
//! session only, with a close code from [`close_code`] and an `info` line; it cannot panic the
//! process or stall other sessions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_proto::control::{
    encode, encode_relay, ClientMessage, CodecError, Decoder, Record, ServerMessage,
    MAX_CLIENT_MESSAGE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at};
use tracing::{info, warn};

use crate::dispatch::{SessionFault, SessionRef};
use crate::handlers::ApiError;
use crate::hub::{CloseReason, Outbound};
use crate::ratelimit::TokenBucket;
use crate::relay::{stream_link, Grants, Link, Relay, SessionLink, Source, StreamQueue};
use crate::server::{close_code, Limits};
use crate::service::{Service, Session};
use crate::telemetry::SessionMeter;

/// How long the coordinator waits for the agent to receive its last message (`Refused`,
/// `Revoked`) before closing the connection.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// The most bytes of relay records a TLS/TCP session writes at once (more queued wait for the
/// next write).
const RELAY_BATCH: usize = 64 * 1024;

/// What a session needs of its connection beyond the stream's two halves.
pub(crate) trait Transport: Sync {
    /// The stream's read half.
    type Read: AsyncRead + Unpin + Send;
    /// The stream's write half.
    type Write: AsyncWrite + Unpin + Send;
    /// Which transport it is, for the metrics.
    const KIND: crate::telemetry::Transport;

    /// The agent's address.
    fn remote(&self) -> SocketAddr;

    /// Where the relay sends frames for this agent when they travel beside the stream (QUIC
    /// datagrams). `None`: they travel as relay records of the stream itself, which then also
    /// carries the agent's frames.
    fn datagram_link(&self) -> Option<SessionLink>;

    /// The next relay frame received beside the stream; `None` once the connection is gone.
    /// Never ready where frames travel on the stream.
    fn datagram(&self) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// Ready once the coordinator shuts down, when the transport does not end its sessions by
    /// itself (QUIC's endpoint does).
    fn shutting_down(&self) -> impl Future<Output = ()> + Send;

    /// Finishes the stream, waiting up to [`LINGER`] for the agent to have received it.
    fn finish(write: &mut Self::Write) -> impl Future<Output = ()> + Send;

    /// Closes the connection with `code` (and `reason`, where the transport carries them).
    fn close(
        self,
        code: u32,
        reason: &'static str,
        read: Self::Read,
        write: Self::Write,
    ) -> impl Future<Output = ()> + Send;
}

/// The caps on connections, over every transport (one definition, shared with the standalone
/// relay): `meshlink_relay::admission`.
pub use meshlink_relay::admission::{Admission, BeforeHello, Connections, Refusal, Slot};

/// The caps of `limits`: `max_connections`, of them `max_unauthenticated` before their hello,
/// `max_unauthenticated_per_ip` of those from one source.
pub fn connections(limits: &Limits) -> Connections {
    Connections::new(
        limits.max_connections,
        limits.max_unauthenticated,
        limits.max_unauthenticated_per_ip,
    )
}

/// How a session ended: the close code, a short reason for the agent, a line for the log.
pub(crate) struct End {
    pub(crate) code: u32,
    pub(crate) peer: &'static str,
    pub(crate) log: String,
}

impl End {
    pub(crate) fn new(code: u32, peer: &'static str, log: impl Into<String>) -> Self {
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

    fn shutdown() -> Self {
        End::new(
            close_code::SHUTDOWN,
            "shutting down",
            "the coordinator is shutting down",
        )
    }

    fn no_relay() -> Self {
        End::protocol("a relay frame, but this coordinator does not relay")
    }
}

/// Serves one session on `transport`'s stream, from the hello to the close. `deadline` ends
/// the time for the hello (it began with the connection's first packet); `before_hello` is
/// given up once the hello is accepted.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<T: Transport>(
    transport: T,
    read: T::Read,
    mut write: T::Write,
    service: &Arc<Service>,
    limits: &Limits,
    relay: Option<&Arc<Relay>>,
    grants: Option<&Arc<Grants>>,
    deadline: tokio::time::Instant,
    before_hello: BeforeHello,
) {
    let records = transport.datagram_link().is_none();
    let mut reader = Reader::new(read, limits, records);
    let end = drive(
        &transport,
        &mut reader,
        &mut write,
        service,
        limits,
        relay,
        grants,
        deadline,
        before_hello,
    )
    .await;
    info!(code = end.code, "session closed: {}", end.log);
    transport
        .close(end.code, end.peer, reader.into_inner(), write)
        .await;
}

#[allow(clippy::too_many_arguments)]
async fn drive<T: Transport>(
    transport: &T,
    reader: &mut Reader<T::Read>,
    write: &mut T::Write,
    service: &Arc<Service>,
    limits: &Limits,
    relay: Option<&Arc<Relay>>,
    grants: Option<&Arc<Grants>>,
    deadline: tokio::time::Instant,
    before_hello: BeforeHello,
) -> End {
    let hello = tokio::select! {
        hello = not_relaying(transport, relay, timeout_at(deadline, read_hello(reader, relay))) => hello,
        () = transport.shutting_down() => return End::shutdown(),
    };
    let hello = match hello {
        Err(_) => {
            return End::new(
                close_code::HELLO_TIMEOUT,
                "no hello in time",
                "no hello in time",
            )
        }
        Ok(Err(end)) => return end,
        Ok(Ok(hello)) => hello,
    };
    let accepted = not_relaying(
        transport,
        relay,
        service.hello(&hello, transport.remote().ip()),
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
                let _ = self::write(write, &frame, limits).await;
                T::finish(write).await;
            };
            not_relaying(transport, relay, last_words).await;
            return End::new(code, what, format!("hello not served: {e}"));
        }
    };
    // A node now: its connection no longer counts among those before their hello.
    drop(before_hello);
    // Counted open until the session ends (dropped with this function's frame).
    let meter = SessionMeter::open(T::KIND);
    tracing::Span::current().record("node", session.node);
    info!(
        name = %session.name,
        network = %session.network,
        joined = session.joined,
        "session open"
    );
    // Registered before the welcome is written, so that a peer told of this node can reach
    // it at once; removed when the session ends.
    let datagrams = transport.datagram_link();
    let mut queue = None;
    let relaying = relay.map(|relay| {
        let link = datagrams.clone().unwrap_or_else(|| {
            let (link, q) = stream_link();
            queue = Some(q);
            SessionLink::Stream(link)
        });
        let route = relay.register(
            hello.public_key,
            &session.network,
            session.attached.serial,
            link.clone(),
        );
        let source = relay.source(hello.public_key, &session.network, Instant::now());
        (relay, route, source, link)
    });
    // Grants of the standalone relays go on the session's relay channel, beside the rest.
    let granting = match (grants, &relaying) {
        (Some(grants), Some((_, _, _, link))) => Some((grants.clone(), link.clone())),
        _ => None,
    };
    let relaying = relaying.map(|(relay, route, source, _)| (relay, route, source));
    let network = session.network.clone();
    let granted = send_grants(granting, hello.public_key, &network, session.node);
    let control = async {
        // Over QUIC, relay frames are datagrams, forwarded by a loop of their own beside the
        // session's; over TLS/TCP they are records of the stream, which the session loop
        // reads and writes (`queue`). The route lives as long as the session.
        let (in_stream, as_datagrams, _route) = match relaying {
            Some((relay, route, source)) if datagrams.is_some() => {
                (None, Some((relay, source)), Some(route))
            }
            Some((relay, route, source)) => (Some((relay, source)), None, Some(route)),
            None => (None, None, None),
        };
        let control = session_loop(
            transport,
            write,
            reader,
            service,
            &mut session,
            limits,
            &meter,
            in_stream,
            queue,
        );
        match as_datagrams {
            Some((relay, source)) => tokio::select! {
                end = control => end,
                never = relay_datagrams(transport, relay, source) => match never {},
            },
            None => control.await,
        }
    };
    let end = tokio::select! {
        end = control => end,
        never = granted => match never {},
    };
    service
        .session_closed(&session.network, session.node, session.attached.serial)
        .await;
    end
}

/// Sends the session's node its grants ([`Grants`]) on `link`: a few at first
/// ([`crate::relay::GRANT_FIRST`]: a QUIC datagram may be lost), then every
/// [`Grants::every`], each with a fresh ticket. Never returns; without grants it waits for
/// ever (the session's end is the control loop's to say).
async fn send_grants(
    granting: Option<(Arc<Grants>, SessionLink)>,
    key: meshlink_proto::PublicKey,
    network: &str,
    node: meshlink_proto::NodeId,
) -> std::convert::Infallible {
    let Some((grants, link)) = granting else {
        return std::future::pending().await;
    };
    let start = tokio::time::Instant::now();
    let mut at = start;
    let mut id: u16 = 0;
    for n in 0usize.. {
        tokio::time::sleep_until(at).await;
        // An agent that takes no datagrams (or too small ones) gets no grant: it could not use
        // the relays' datagrams either. Not logged: it is the agent's choice.
        let max = link.max_datagram_size().unwrap_or(0);
        if max <= meshlink_proto::relay::HEADER_LEN {
            return std::future::pending().await;
        }
        match grants.frames(key, network, node, std::time::SystemTime::now(), id, max) {
            Ok(frames) => {
                for f in frames {
                    // A full queue loses this grant; the next one comes.
                    let _ = link.send(f);
                }
            }
            Err(e) => warn!("cannot grant relays: {e}"),
        }
        id = id.wrapping_add(1);
        at = match crate::relay::GRANT_FIRST.get(n + 1) {
            Some(after) => start + *after,
            None => at + grants.every(),
        };
    }
    std::future::pending().await
}

/// Reads up to the hello, dropping (and counting) the relay records before it.
async fn read_hello<R: AsyncRead + Unpin>(
    reader: &mut Reader<R>,
    relay: Option<&Arc<Relay>>,
) -> Result<meshlink_proto::control::Hello, End> {
    loop {
        match reader.next().await.map_err(End::read)? {
            Record::Relay(_) => match relay {
                Some(relay) => relay.count_unauthenticated(),
                None => return Err(End::no_relay()),
            },
            Record::Message(ClientMessage::Hello(hello)) => return Ok(hello),
            Record::Message(_) => return Err(End::protocol("the first message was not a hello")),
        }
    }
}

/// Runs `work` while dropping (and counting) the datagrams the connection receives: before
/// its hello is accepted, a connection is no source of relayed frames.
pub(crate) async fn not_relaying<T: Transport, O>(
    transport: &T,
    relay: Option<&Arc<Relay>>,
    work: impl Future<Output = O>,
) -> O {
    let Some(relay) = relay else {
        return work.await;
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            datagram = transport.datagram() => match datagram {
                Some(_) => relay.count_unauthenticated(),
                // The connection is gone: `work` ends with it.
                None => return work.await,
            },
        }
    }
}

/// Relays the session's datagrams for as long as the session lasts (never returns: the
/// session's end is the control loop's to say).
async fn relay_datagrams<T: Transport>(
    transport: &T,
    relay: &Relay,
    mut source: Source,
) -> std::convert::Infallible {
    loop {
        match transport.datagram().await {
            Some(datagram) => {
                // Dropped frames are counted by the relay; none is logged.
                let _ = relay.forward(&mut source, datagram, Instant::now());
            }
            None => std::future::pending().await,
        }
    }
}

/// The next frame the relay queued for a stream session; never ready without a queue (or once
/// a newer session took the route and with it the queue's other end).
async fn queued_frame(queue: &mut Option<StreamQueue>) -> Vec<u8> {
    if let Some(q) = queue {
        if let Some(frame) = q.recv().await {
            return frame;
        }
    }
    std::future::pending().await
}

#[allow(clippy::too_many_arguments)]
async fn session_loop<T: Transport>(
    transport: &T,
    write: &mut T::Write,
    reader: &mut Reader<T::Read>,
    service: &Arc<Service>,
    session: &mut Session,
    limits: &Limits,
    meter: &SessionMeter,
    mut stream_relay: Option<(&Arc<Relay>, Source)>,
    mut queue: Option<StreamQueue>,
) -> End {
    // Frames go compressed where the agent's hello said it takes them (large ones only).
    let compression = session.attached.features.compression;
    // Counts a frame once it is written.
    let pushed = |frame: &crate::hub::Frame, bytes: usize| {
        meter.written(frame, bytes, service.instant());
    };
    if let Err(end) = self::write(write, &session.welcome, limits).await {
        return end;
    }
    pushed(&session.welcome, session.welcome.len());
    {
        let full_map = session.attached.take_full_map();
        let bytes = full_map.bytes(compression);
        if let Err(end) = self::write(write, bytes, limits).await {
            return end;
        }
        pushed(&full_map, bytes.len());
    }
    loop {
        tokio::select! {
            record = reader.next() => match record {
                Ok(Record::Message(msg)) => {
                    let from = SessionRef {
                        node: session.node,
                        network: &session.network,
                        remote: transport.remote().ip(),
                        serial: session.attached.serial,
                    };
                    match service.on_agent_message(from, msg).await {
                        Ok(Some(frame)) => {
                            let bytes = frame.bytes(compression);
                            if let Err(end) = self::write(write, bytes, limits).await {
                                return end;
                            }
                            pushed(&frame, bytes.len());
                        }
                        Ok(None) => {}
                        Err(SessionFault::Api(e)) => return End::api(&e),
                        Err(SessionFault::NetworkGone) => {
                            return End::new(close_code::INTERNAL, "internal error", "the network is gone")
                        }
                        Err(SessionFault::SecondHello) => return End::protocol("a second hello"),
                    }
                }
                Ok(Record::Relay(frame)) => match &mut stream_relay {
                    // Dropped frames are counted by the relay; none is logged.
                    Some((relay, source)) => {
                        let _ = relay.forward(source, frame, Instant::now());
                    }
                    None => return End::no_relay(),
                },
                Err(fail) => return End::read(fail),
            },
            out = session.attached.rx.recv() => match out {
                Some(Outbound::Frame(frame)) => {
                    let bytes = frame.bytes(compression);
                    if let Err(end) = self::write(write, bytes, limits).await {
                        return end;
                    }
                    pushed(&frame, bytes.len());
                }
                Some(Outbound::Close(reason)) => {
                    T::finish(write).await;
                    return End::hub(reason);
                }
                None => return End::new(close_code::LAGGING, "too slow", "dropped: its queue was full"),
            },
            frame = queued_frame(&mut queue) => {
                let batch = relay_batch(frame, queue.as_mut());
                if let Err(end) = self::write(write, &batch, limits).await {
                    return end;
                }
            },
            () = transport.shutting_down() => return End::shutdown(),
        }
    }
}

/// `first` and whatever else is queued now, up to [`RELAY_BATCH`] bytes, as relay records.
fn relay_batch(first: Vec<u8>, queue: Option<&mut StreamQueue>) -> Vec<u8> {
    let mut batch = Vec::with_capacity(RELAY_BATCH.min(8 * first.len() + 64));
    // The relay queues only frames of at most MAX_RELAY_RECORD bytes (the link's
    // max_datagram_size): a frame that cannot be a record is not there to skip.
    batch.extend(encode_relay(&first).unwrap_or_default());
    if let Some(queue) = queue {
        while batch.len() < RELAY_BATCH {
            let Some(frame) = queue.try_recv() else { break };
            batch.extend(encode_relay(&frame).unwrap_or_default());
        }
    }
    batch
}

async fn write<W: AsyncWrite + Unpin>(
    write: &mut W,
    frame: &[u8],
    limits: &Limits,
) -> Result<(), End> {
    let written = async {
        write.write_all(frame).await?;
        write.flush().await
    };
    match timeout(limits.write_timeout, written).await {
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

/// Reads records from the stream, enforcing the size caps and the message rate cap. Relay
/// records are passed on only where the stream carries them (TLS/TCP); on a QUIC stream one is
/// a malformed message.
struct Reader<R> {
    recv: R,
    records: bool,
    decoder: Decoder,
    buf: Box<[u8]>,
    bucket: TokenBucket,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(recv: R, limits: &Limits, records: bool) -> Self {
        Reader {
            recv,
            records,
            decoder: Decoder::new(MAX_CLIENT_MESSAGE),
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
            bucket: TokenBucket::new(limits.message_rate, limits.message_burst, Instant::now()),
        }
    }

    /// The next record. Cancel-safe: bytes are only taken from the stream and pushed into
    /// the decoder together, with no await in between.
    async fn next(&mut self) -> Result<Record<ClientMessage>, ReadFail> {
        loop {
            match self.decoder.decode_record::<ClientMessage>() {
                Err(e) => return Err(ReadFail::Codec(e)),
                Ok(Some(Record::Message(msg))) => {
                    if !self.bucket.allow(Instant::now()) {
                        return Err(ReadFail::RateLimited);
                    }
                    return Ok(Record::Message(msg));
                }
                Ok(Some(Record::Relay(_))) if !self.records => {
                    return Err(ReadFail::Codec(CodecError::Malformed(
                        "a relay frame where a message was expected".into(),
                    )))
                }
                Ok(Some(record)) => return Ok(record),
                Ok(None) => {}
            }
            match self.recv.read(&mut self.buf).await {
                Ok(0) => return Err(ReadFail::Finished),
                Ok(n) => self.decoder.push(&self.buf[..n]).map_err(ReadFail::Codec)?,
                Err(e) => return Err(ReadFail::Transport(e.to_string())),
            }
        }
    }

    fn into_inner(self) -> R {
        self.recv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_reader_passes_relay_records_only_where_the_stream_carries_them() {
        let mut bytes = encode_relay(&[7; 40]).unwrap();
        bytes.extend(encode(&ClientMessage::FullMapRequest));
        let limits = Limits::default();
        let mut tcp = Reader::new(&bytes[..], &limits, true);
        assert!(matches!(tcp.next().await, Ok(Record::Relay(f)) if f == [7; 40]));
        assert!(matches!(
            tcp.next().await,
            Ok(Record::Message(ClientMessage::FullMapRequest))
        ));
        assert!(matches!(tcp.next().await, Err(ReadFail::Finished)));
        let mut quic = Reader::new(&bytes[..], &limits, false);
        assert!(matches!(
            quic.next().await,
            Err(ReadFail::Codec(CodecError::Malformed(_)))
        ));
    }

    #[test]
    fn a_batch_holds_whole_records() {
        let (link, mut queue) = stream_link();
        for i in 0..40u8 {
            crate::relay::Link::send(&link, vec![i; 2000]).unwrap();
        }
        let batch = relay_batch(vec![9; 10], Some(&mut queue));
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        d.push(&batch).unwrap();
        let mut frames = Vec::new();
        while let Some(r) = d.decode_record::<ClientMessage>().unwrap() {
            match r {
                Record::Relay(f) => frames.push(f),
                Record::Message(m) => panic!("{m:?}"),
            }
        }
        assert_eq!(d.buffered(), 0);
        assert_eq!(frames[0], vec![9; 10]);
        assert!(frames.len() > 1 && batch.len() < RELAY_BATCH + 2004);
        assert!(
            queue.try_recv().is_some(),
            "the rest waits for the next write"
        );
    }
}
