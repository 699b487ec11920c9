//! One relay session, over QUIC (frames as datagrams) or TLS over TCP (frames as relay records
//! of the stream), from the moment its handshake chose [`RELAY_ALPN`]: the hello with its
//! ticket ([`crate::ticket`]), then frames both ways through the [`Relay`] until it ends.
//! [`Sessions`] serves what a listener hands it: the standalone relay's ([`crate::server`]),
//! and a coordinator's of a mesh of several, whose own port answers this ALPN beside its
//! control sessions', so that agents of every coordinator meet at each.
//!
//! Pipeline of a session:
//!
//! ```text
//! admitted by its listener (at most max_sessions at once, of them max_unauthenticated before
//!   their hello and max_unauthenticated_per_ip from one source: crate::admission; else
//!   refused at once)
//!   ─> TLS 1.3 handshake, ALPN meshlink-relay/1     within hello_timeout, with the hello
//!   ─> RelayHello (one control-framed message, at most MAX_RELAY_MESSAGE bytes)
//!   ─> Verifier::verify(ticket, now)                refused: RelayAnswer::Refused, close
//!   ─> check_proof(ticket, this connection's TLS exporter value, proof)
//!                                                   refused: a replayed or foreign ticket
//!   ─> at most max_sessions_per_ip sessions from one source (the listener's cap: a
//!      coordinator sets none after the hello)             refused: RelayAnswer::Refused
//!   ─> route for (key, network) (at most 2 sessions each: a third closes the oldest; one
//!      byte cap for the node's sessions), RelayAnswer::Accepted { expires }
//!   ─> loop: frames from the agent ─> Relay::forward (rate cap, network, queue caps); one for
//!            a node with no session here draws a notice back (relay_one, capped)
//!            frames for the agent (a QUIC datagram, or records the writer batches)
//!      until the agent closes, the connection dies, the ticket expires (the agent opens
//!      a new session with a fresh ticket before that), or two newer sessions of the node
//!      displaced it
//! ```
//!
//! # Security
//! No open relay: frames are read only after a ticket signed by the mesh's coordinators was
//! verified and proved the presenter's own (the hello signs this connection's exporter value
//! with the ticket's proof key: a ticket seen elsewhere cannot be replayed here), and go only
//! to nodes of the ticket's network. Nothing before that is buffered
//! beyond one hello; every queue is bounded (quinn's datagram buffers, [`STREAM_SEND_BUFFER`]);
//! each node is capped in bytes per second, over all its sessions, of which it has at most
//! [`crate::forward::MAX_SESSIONS_PER_NODE`]; one source address holds at most
//! `max_sessions_per_ip` sessions, so neither many sessions of one node nor many nodes behind
//! one address can take the relay. The relay reads no plaintext: frames carry
//! WireGuard ciphertext.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshlink_proto::control::{encode, encode_relay, Decoder, Record, RELAY_RECORD};
use meshlink_proto::relay::{
    unreachable_notice, RelayAnswer, RelayHello, TicketBody, EXPORTER_LABEL, EXPORTER_LEN,
    MAX_RELAY_MESSAGE, RELAY_ALPN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout_at;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use crate::admission::{AfterHello, BeforeHello};
use crate::forward::{
    stream_link, Dropped, Link, Relay, SessionLink, StreamQueue, STREAM_SEND_BUFFER,
};
use crate::outcome::{HelloRefusal, Outcomes, SessionEnd};
use crate::ratelimit::TokenBucket;
use crate::ticket::Verifier;

/// The most bytes of relay records a TLS/TCP session writes at once.
const RELAY_BATCH: usize = 64 * 1024;

/// What every session of one relay shares: the forwarding core, the ticket check, the counts
/// of hellos and ends, and the stop switch.
pub struct Sessions {
    relay: Arc<Relay>,
    verifier: Verifier,
    serial: AtomicU64,
    outcomes: Outcomes,
    hello_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("coordinator", &self.verifier.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions forwarded by `relay`, opened with tickets `verifier` accepts, each given
    /// `hello_timeout` from its first packet for its handshake and hello, all ended when
    /// `shutdown` changes.
    pub fn new(
        relay: Arc<Relay>,
        verifier: Verifier,
        hello_timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Sessions {
            relay,
            verifier,
            serial: AtomicU64::new(0),
            outcomes: Outcomes::default(),
            hello_timeout,
            shutdown,
        }
    }

    /// The forwarding core (counters, routes).
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// How long a new connection has for its handshake and hello.
    pub fn hello_timeout(&self) -> Duration {
        self.hello_timeout
    }

    /// The fingerprint of the certificate tickets are checked against.
    pub fn coordinator_fingerprint(&self) -> String {
        self.verifier.fingerprint()
    }

    /// Hellos accepted and refused, and sessions ended, by reason, since start.
    pub fn outcomes(&self) -> &Outcomes {
        &self.outcomes
    }

    /// Counts and logs how a session ended, whatever its transport.
    fn session_ended(&self, node: u64, why: &SessionEnd) {
        self.outcomes.ended(why);
        info!(node, reason = why.reason(), "session closed: {why}");
    }

    /// Serves a QUIC connection whose handshake chose [`RELAY_ALPN`]: its stream's hello by
    /// `deadline`, then its datagrams both ways until the session ends. `before_hello` is its
    /// place among the listener's connections before their hello.
    pub async fn serve_quic(
        &self,
        conn: quinn::Connection,
        deadline: tokio::time::Instant,
        before_hello: BeforeHello,
    ) {
        let (mut send, mut recv) = match timeout_at(deadline, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
        let mut exporter = [0u8; EXPORTER_LEN];
        if conn
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .is_err()
        {
            conn.close(1u32.into(), b"no exporter");
            return;
        }
        let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
        // Datagrams before the hello are not read: quinn's bounded buffer drops them.
        let verdict = match hello(&mut recv, &mut decoder, self, &exporter, deadline).await {
            Ok(v) => v,
            Err(why) => {
                debug!("{why}");
                conn.close(1u32.into(), why.as_bytes());
                return;
            }
        };
        // A node now: it no longer counts among the connections before their hello.
        let (verdict, _after_hello) = accept(verdict, before_hello);
        let Some(body) = answer(&mut send, verdict, self).await else {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(2u32.into(), b"refused");
            return;
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let route = self.relay.register(
            body.key,
            &body.network,
            serial,
            SessionLink::Quic(conn.clone()),
        );
        let mut source = self.relay.source(body.key, &body.network, Instant::now());
        let mut notices = Notices::new(SessionLink::Quic(conn.clone()));
        info!(node = body.node, network = %body.network, "session open");
        let ends = expiry(body.expires);
        let mut shutdown = self.shutdown.clone();
        let mut rest = [0u8; 64];
        let why = loop {
            tokio::select! {
                d = conn.read_datagram() => match d {
                    Ok(d) => {
                        // Dropped frames are counted by the relay; none is logged.
                        relay_one(self, &mut source, &mut notices, d.to_vec());
                    }
                    Err(
                        quinn::ConnectionError::ApplicationClosed(_)
                        | quinn::ConnectionError::ConnectionClosed(_),
                    ) => break SessionEnd::AgentClosed,
                    Err(e) => break SessionEnd::ConnectionLost(e.to_string()),
                },
                // The agent says nothing more on the stream; its end is the session's.
                r = recv.read(&mut rest) => match r {
                    Ok(Some(_)) => break SessionEnd::ProtocolError("a message after the hello"),
                    _ => break SessionEnd::AgentClosed,
                },
                () = tokio::time::sleep_until(ends) => break SessionEnd::TicketExpired,
                () = route.displaced() => break SessionEnd::Displaced,
                _ = shutdown.changed() => break SessionEnd::Shutdown,
            }
        };
        self.session_ended(body.node, &why);
        conn.close(0u32.into(), b"done");
    }

    /// Serves a TLS/TCP connection whose handshake chose [`RELAY_ALPN`] (any other is
    /// dropped): its hello by `deadline`, then relay records both ways until the session
    /// ends. `before_hello` is its place among the listener's connections before their hello.
    pub async fn serve_tls(
        &self,
        tls: TlsStream<TcpStream>,
        deadline: tokio::time::Instant,
        before_hello: BeforeHello,
    ) {
        if tls.get_ref().1.alpn_protocol() != Some(RELAY_ALPN) {
            return;
        }
        let Ok(exporter) = tls.get_ref().1.export_keying_material(
            [0u8; EXPORTER_LEN],
            EXPORTER_LABEL,
            Some(b"".as_slice()),
        ) else {
            return;
        };
        let (mut read, mut write) = tokio::io::split(tls);
        // Frames from the agent are whole WireGuard datagrams: records up to MAX_RELAY_RECORD.
        let mut decoder = Decoder::new(MAX_RELAY_MESSAGE);
        let verdict = match hello(&mut read, &mut decoder, self, &exporter, deadline).await {
            Ok(v) => v,
            Err(why) => {
                debug!("{why}");
                return;
            }
        };
        let (verdict, _after_hello) = accept(verdict, before_hello);
        let Some(body) = answer(&mut write, verdict, self).await else {
            let _ = write.shutdown().await;
            return;
        };
        let (link, mut queue) = stream_link();
        let mut notices = Notices::new(SessionLink::Stream(link.clone()));
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let route = self
            .relay
            .register(body.key, &body.network, serial, SessionLink::Stream(link));
        let mut source = self.relay.source(body.key, &body.network, Instant::now());
        info!(node = body.node, network = %body.network, "session open");
        let ends = expiry(body.expires);
        let mut shutdown = self.shutdown.clone();
        let mut buf = vec![0u8; 16 * 1024];
        // Frames that came with the hello.
        let mut first = drain(&mut decoder, self, &mut source, &mut notices).err();
        let why = loop {
            if let Some(e) = first.take() {
                break SessionEnd::ProtocolError(e);
            }
            tokio::select! {
                r = read.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break SessionEnd::AgentClosed,
                    Ok(n) => {
                        if decoder.push(&buf[..n]).is_err() {
                            break SessionEnd::ProtocolError("an oversized record");
                        }
                        if let Err(e) = drain(&mut decoder, self, &mut source, &mut notices) {
                            break SessionEnd::ProtocolError(e);
                        }
                    }
                },
                frame = queue_next(&mut queue) => {
                    let batch = batch(frame, &mut queue);
                    let w = async { write.write_all(&batch).await?; write.flush().await };
                    if tokio::time::timeout(Duration::from_secs(10), w).await.map_or(true, |r| r.is_err()) {
                        break SessionEnd::Stalled;
                    }
                },
                () = tokio::time::sleep_until(ends) => break SessionEnd::TicketExpired,
                () = route.displaced() => break SessionEnd::Displaced,
                _ = shutdown.changed() => break SessionEnd::Shutdown,
            }
        };
        self.session_ended(body.node, &why);
        let _ = write.shutdown().await;
    }
}

/// Reads the hello from `read` by `deadline` and checks its ticket, and that the ticket is
/// proved over this connection, whose TLS exporter value is `exporter`.
async fn hello<R: AsyncRead + Unpin>(
    read: &mut R,
    decoder: &mut Decoder,
    sessions: &Sessions,
    exporter: &[u8; EXPORTER_LEN],
    deadline: tokio::time::Instant,
) -> Result<Result<TicketBody, HelloRefusal>, &'static str> {
    let mut buf = [0u8; 4096];
    // The first record's length prefix: a relay record there is refused at once, so that
    // nothing beyond one hello (MAX_RELAY_MESSAGE) is buffered before it is verified.
    let mut prefix = [0u8; 4];
    let mut seen = 0;
    let hello = loop {
        match decoder.decode::<RelayHello>() {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(_) => return Err("malformed hello"),
        }
        match timeout_at(deadline, read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err("closed before its hello"),
            Err(_) => return Err("no hello in time"),
            Ok(Ok(n)) => {
                if seen < prefix.len() {
                    let take = (prefix.len() - seen).min(n);
                    prefix[seen..seen + take].copy_from_slice(&buf[..take]);
                    seen += take;
                    if seen == prefix.len() && u32::from_be_bytes(prefix) & RELAY_RECORD != 0 {
                        return Err("a relay record before the hello");
                    }
                }
                decoder.push(&buf[..n]).map_err(|_| "oversized hello")?;
            }
        }
    };
    if hello.protocol != meshlink_proto::relay::RELAY_PROTOCOL {
        return Ok(Err(HelloRefusal::Protocol(hello.protocol)));
    }
    Ok(sessions
        .verifier
        .verify(&hello.ticket, unix_now())
        .and_then(|body| {
            crate::ticket::check_proof(&body, exporter, &hello.proof)?;
            Ok(body)
        })
        .map_err(HelloRefusal::from))
}

/// A verified hello takes its place among its source's sessions, or is refused.
fn accept(
    verdict: Result<TicketBody, HelloRefusal>,
    before_hello: BeforeHello,
) -> (Result<TicketBody, HelloRefusal>, Option<AfterHello>) {
    match verdict {
        Ok(body) => match before_hello.accept() {
            Ok(after) => (Ok(body), Some(after)),
            // The one cap after the hello: max_sessions_per_ip.
            Err(_) => (Err(HelloRefusal::SessionsPerSource), None),
        },
        Err(e) => (Err(e), None),
    }
}

/// Writes the answer; the accepted ticket's body once the answer is written (the hello
/// counted as accepted), or `None` when refused (counted, logged) or unwritten.
async fn answer<W: AsyncWrite + Unpin>(
    write: &mut W,
    verdict: Result<TicketBody, HelloRefusal>,
    sessions: &Sessions,
) -> Option<TicketBody> {
    let (msg, body) = match verdict {
        Ok(body) => (
            RelayAnswer::Accepted {
                expires: body.expires,
            },
            Some(body),
        ),
        Err(why) => {
            sessions.outcomes.refused(&why);
            info!(reason = why.reason(), "hello refused: {why}");
            (
                RelayAnswer::Refused {
                    reason: why.to_string(),
                },
                None,
            )
        }
    };
    let written = async {
        write.write_all(&encode(&msg)).await?;
        write.flush().await
    };
    match tokio::time::timeout(Duration::from_secs(5), written).await {
        Ok(Ok(())) => {
            if body.is_some() {
                sessions.outcomes.accepted();
            }
            body
        }
        _ => None,
    }
}

/// When the session of a ticket expiring at `expires` (Unix seconds) must end.
fn expiry(expires: u64) -> tokio::time::Instant {
    let left = expires
        .saturating_add(crate::ticket::CLOCK_SKEW)
        .saturating_sub(unix_now());
    tokio::time::Instant::now() + Duration::from_secs(left)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Forwards every whole relay record the decoder holds.
fn drain(
    decoder: &mut Decoder,
    sessions: &Sessions,
    source: &mut crate::forward::Source,
    notices: &mut Notices,
) -> Result<(), &'static str> {
    loop {
        match decoder.decode_record::<serde_json::Value>() {
            Ok(Some(Record::Relay(frame))) => relay_one(sessions, source, notices, frame),
            Ok(Some(Record::Message(_))) => return Err("a message after the hello"),
            Ok(None) => return Ok(()),
            Err(_) => return Err("a malformed record"),
        }
    }
}

/// The most notices a session is sent per second (and at once).
pub const NOTICES_PER_SECOND: u32 = 20;

/// A session's notices back to its agent: where they go, and their cap.
struct Notices {
    link: SessionLink,
    bucket: TokenBucket,
}

impl Notices {
    fn new(link: SessionLink) -> Self {
        Notices {
            link,
            bucket: TokenBucket::new(NOTICES_PER_SECOND, NOTICES_PER_SECOND, Instant::now()),
        }
    }
}

/// Relays one frame from `source`; a frame for a node with no session here draws a notice
/// back ([`unreachable_notice`]), at most [`NOTICES_PER_SECOND`], so that the sender reaches
/// that peer another way. Drops are counted by the relay; none is logged.
fn relay_one(
    sessions: &Sessions,
    source: &mut crate::forward::Source,
    notices: &mut Notices,
    frame: Vec<u8>,
) {
    let to = meshlink_proto::relay::parse(&frame)
        .ok()
        .map(|(h, _)| h.peer);
    let now = Instant::now();
    if sessions.relay.forward(source, frame, now) == Err(Dropped::NoRoute) {
        if let Some(to) = to.filter(|to| *to != source.key()) {
            if notices.bucket.allow(now) {
                // A full queue loses the notice; the next frame for that peer draws another.
                let _ = notices.link.send(unreachable_notice(&to));
            }
        }
    }
}

async fn queue_next(queue: &mut StreamQueue) -> Vec<u8> {
    match queue.recv().await {
        Some(f) => f,
        None => std::future::pending().await,
    }
}

/// `first` and whatever else is queued now, up to [`RELAY_BATCH`] bytes, as relay records.
fn batch(first: Vec<u8>, queue: &mut StreamQueue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RELAY_BATCH.min(8 * first.len() + 64));
    out.extend(encode_relay(&first).unwrap_or_default());
    while out.len() < RELAY_BATCH.min(STREAM_SEND_BUFFER) {
        let Some(f) = queue.try_recv() else { break };
        out.extend(encode_relay(&f).unwrap_or_default());
    }
    out
}
