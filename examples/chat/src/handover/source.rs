//! The source's side of a handover: freeze the room, ship it, and either let it go on `left`
//! (after sending the final frame) or resume it here.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time;
use tracing::{debug, info};

use meshlink_tcp_migrate::{freeze, Frozen, MigrateError, Parked};

use super::{read_frame, to_tokio, Node};
use crate::migrate::{self, Connection, Final, Reply, State};
use crate::protocol::Nick;
use crate::room::Membership;
use crate::server::{millis, Paused, Session};

/// A connection frozen at the source: parked here, shipped to the destination.
#[derive(Debug)]
struct Outbound {
    parked: Parked,
    socket: Frozen,
    peer: SocketAddr,
    nick: Option<Nick>,
    membership: Option<Membership>,
    unread: Vec<u8>,
    pending: Vec<u8>,
}

/// A handover out that the destination took: waiting for `event=left`.
#[derive(Debug)]
pub(super) struct Outgoing {
    to: String,
    connections: Vec<Outbound>,
    /// The handover connection, for the final frame.
    stream: TcpStream,
    /// When to give up waiting for `event=left` and resume here.
    pub(super) deadline: Instant,
}

/// What became of a paused connection at the freeze.
enum Freezing {
    /// Frozen.
    Frozen(Outbound),
    /// Its client closed it (or it failed): it is gone.
    Gone { peer: SocketAddr, session: Session },
    /// Freezing failed; the connection is as it was.
    Failed { paused: Paused, error: MigrateError },
}

/// Freezes one paused connection. `freeze` takes the socket even when it fails, so it is
/// given a second descriptor of it: on failure the first one carries on.
fn freeze_one(p: Paused) -> Freezing {
    let Paused {
        stream,
        peer,
        session,
    } = p;
    let Ok(stream) = stream.into_std() else {
        return Freezing::Gone { peer, session };
    };
    let copy = match stream.try_clone() {
        Ok(copy) => copy,
        Err(source) => {
            return back_to_tokio(
                stream,
                peer,
                session,
                MigrateError::Socket {
                    step: "duplicate the socket",
                    source,
                },
            );
        }
    };
    match freeze(copy) {
        Ok((socket, parked)) => {
            // The parked descriptor is the socket's last: discarding it closes silently.
            drop(stream);
            Freezing::Frozen(Outbound {
                parked,
                socket,
                peer,
                nick: session.nick,
                membership: session.membership,
                unread: session.unread,
                pending: session.pending,
            })
        }
        Err(MigrateError::NotEstablished(_)) => Freezing::Gone { peer, session },
        Err(error) => back_to_tokio(stream, peer, session, error),
    }
}

fn back_to_tokio(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    session: Session,
    error: MigrateError,
) -> Freezing {
    match TcpStream::from_std(stream) {
        Ok(stream) => Freezing::Failed {
            paused: Paused {
                stream,
                peer,
                session,
            },
            error,
        },
        Err(_) => Freezing::Gone { peer, session },
    }
}

/// A frozen connection goes on here, as if it had not been frozen.
fn resume_here(o: Outbound) -> Result<Paused, (MigrateError, Option<Nick>, Option<Membership>)> {
    match o.parked.resume().and_then(to_tokio) {
        Ok(stream) => Ok(Paused {
            stream,
            peer: o.peer,
            session: Session {
                nick: o.nick,
                membership: o.membership,
                unread: o.unread,
                pending: o.pending,
            },
        }),
        Err(e) => Err((e, o.nick, o.membership)),
    }
}

/// Whether the room evicted the member while it was paused.
fn was_evicted(o: &mut Outbound) -> bool {
    o.membership.as_mut().is_some_and(|m| {
        matches!(
            m.evicted.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        )
    })
}

/// Moves what waits in each member's outbox to its pending output.
fn drain_outboxes(outbound: &mut [Outbound]) {
    for o in outbound {
        if let Some(m) = &mut o.membership {
            while let Ok(line) = m.outbox.try_recv() {
                o.pending.extend_from_slice(line.as_bytes());
            }
        }
    }
}

/// Connects to the destination (from `bind`, this node's mesh address, when known), sends
/// the state frame and reads the reply.
async fn send_state(
    bind: Option<IpAddr>,
    destination: SocketAddr,
    frame: &[u8],
) -> Result<(TcpStream, Reply), String> {
    let socket = if destination.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == destination.is_ipv4()) {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind to the holder's address {ip}: {e}"))?;
    }
    let mut stream = socket
        .connect(destination)
        .await
        .map_err(|e| format!("connect to {destination}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(frame)
        .await
        .map_err(|e| format!("send to {destination}: {e}"))?;
    let body = read_frame(&mut stream, migrate::MAX_REPLY)
        .await
        .map_err(|e| format!("the reply from {destination}: {e}"))?;
    let reply = Reply::decode(&body).map_err(|e| format!("the reply from {destination}: {e}"))?;
    Ok((stream, reply))
}

impl Node {
    /// Hands the room over to `to` at `address`; on failure everything goes on here and the
    /// error is returned for the agent.
    pub(super) async fn hand_over(
        &mut self,
        generation: u64,
        to: &str,
        address: IpAddr,
    ) -> Result<(), String> {
        if self.outgoing.is_some() {
            return Err("a handover is already under way".into());
        }
        let started = Instant::now();
        let paused = self.connections.pause().await;
        let outbound = match self.freeze_all(paused) {
            Ok(outbound) => outbound,
            Err((e, count)) => {
                info!("migrate: handover to {to} failed: {e}; resumed {count} connections here");
                return Err(e);
            }
        };
        info!(
            "migrate: froze {} connections in {:.1} ms",
            outbound.len(),
            millis(started.elapsed())
        );
        let state = State {
            workload: self.config.workload.clone(),
            generation,
            from: self.connections.name().to_string(),
            connections: outbound
                .iter()
                .map(|o| Connection {
                    socket: o.socket.clone(),
                    nick: o.nick.clone(),
                    unread: o.unread.clone(),
                    pending: o.pending.clone(),
                })
                .collect(),
        };
        let body = state.encode();
        let destination = SocketAddr::new(address, self.handover_port);
        let sent = Instant::now();
        let result = if body.len() > migrate::MAX_MESSAGE {
            Err(format!(
                "the state is {} bytes, over the limit of {}",
                body.len(),
                migrate::MAX_MESSAGE
            ))
        } else {
            let bind = self.holder.as_ref().map(|(_, ip)| *ip);
            match time::timeout(
                self.config.handover_timeout,
                send_state(bind, destination, &migrate::frame(&body)),
            )
            .await
            {
                Ok(Ok((stream, Reply::Ready))) => Ok(stream),
                Ok(Ok((_, Reply::Refused(why)))) => Err(format!("{to} refused: {why}")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!(
                    "no answer from {to} at {destination} within {} ms",
                    self.config.handover_timeout.as_millis()
                )),
            }
        };
        match result {
            Ok(stream) => {
                info!(
                    "migrate: handed over {} connections ({} bytes) to {to} in {:.1} ms",
                    outbound.len(),
                    body.len() + 4,
                    millis(sent.elapsed())
                );
                self.outgoing = Some(Outgoing {
                    to: to.to_string(),
                    connections: outbound,
                    stream,
                    deadline: Instant::now() + self.config.outcome_timeout,
                });
                Ok(())
            }
            Err(e) => {
                let count = outbound.len();
                self.resume_all(outbound);
                info!("migrate: handover to {to} failed: {e}; resumed {count} connections here");
                Err(e)
            }
        }
    }

    /// Freezes every paused connection. A connection that is no longer established (its
    /// client closed it) leaves the room; a member evicted meanwhile, or with more output
    /// waiting than a handover carries, is dropped as too slow. Any other failure resumes
    /// everything and is returned, with the count of connections resumed.
    fn freeze_all(&mut self, paused: Vec<Paused>) -> Result<Vec<Outbound>, (String, usize)> {
        let mut frozen = Vec::with_capacity(paused.len());
        let mut rest = paused.into_iter();
        while let Some(p) = rest.next() {
            match freeze_one(p) {
                Freezing::Frozen(o) => frozen.push(o),
                Freezing::Gone { peer, session } => self.gone(peer, session),
                Freezing::Failed { paused, error } => {
                    let error = format!("freeze {}: {error}", paused.peer);
                    let mut count = 1 + frozen.len();
                    self.connections.resume(paused);
                    for p in rest {
                        self.connections.resume(p);
                        count += 1;
                    }
                    self.resume_all(frozen);
                    return Err((error, count));
                }
            }
        }
        let mut kept = Vec::with_capacity(frozen.len());
        for mut o in frozen {
            if was_evicted(&mut o) {
                self.too_slow(o);
            } else {
                kept.push(o);
            }
        }
        // Outboxes are drained once every departure is announced, so that the others'
        // pending output has the announcements.
        drain_outboxes(&mut kept);
        let (mut kept, over): (Vec<_>, Vec<_>) = kept
            .into_iter()
            .partition(|o| o.pending.len() <= migrate::MAX_PENDING);
        if !over.is_empty() {
            for o in over {
                self.too_slow(o);
            }
            drain_outboxes(&mut kept);
        }
        Ok(kept)
    }

    /// A connection whose client went away before the freeze: it leaves the room.
    fn gone(&mut self, peer: SocketAddr, session: Session) {
        match (session.nick, session.membership) {
            (Some(nick), Some(m)) => {
                self.connections.room().leave(m.id, &nick, true);
                info!("{nick} left");
            }
            _ => debug!("{peer} left before NICK"),
        }
    }

    /// Drops a frozen member that reads too slowly: it goes live here and is closed.
    fn too_slow(&mut self, o: Outbound) {
        if let (Some(nick), Some(m)) = (&o.nick, &o.membership) {
            self.connections.room().leave(m.id, nick, true);
            info!("{nick} disconnected: too slow");
        }
        drop(o.parked.resume());
    }

    /// Every frozen connection goes on here.
    fn resume_all(&mut self, outbound: Vec<Outbound>) {
        for o in outbound {
            let peer = o.peer;
            match resume_here(o) {
                Ok(paused) => self.connections.resume(paused),
                Err((e, nick, membership)) => {
                    info!("migrate: {peer}: cannot resume: {e}");
                    self.gone(
                        peer,
                        Session {
                            nick,
                            membership,
                            ..Session::default()
                        },
                    );
                }
            }
        }
        self.connections.mark_resumed();
    }

    /// The source stopped answering for the address: the parked sockets' state is read again
    /// (with what they took in since the freeze) and sent as the final frame, then they are
    /// discarded; this server stands by.
    pub(super) async fn left(&mut self, out: Outgoing, generation: u64) {
        let Outgoing {
            to,
            connections,
            mut stream,
            ..
        } = out;
        let count = connections.len();
        let mut sockets = Vec::with_capacity(count);
        let mut parked = Vec::with_capacity(count);
        for o in connections {
            if let (Some(nick), Some(m)) = (&o.nick, &o.membership) {
                self.connections.room().leave(m.id, nick, false);
            }
            // Read again in repair mode: what the socket took in since the freeze is in it,
            // and nothing is sent (no window probe), so the client hears only from the
            // destination.
            match o.parked.state() {
                Ok(socket) => sockets.push(socket),
                Err(e) => {
                    info!(
                        "migrate: {}: cannot read the parked state again: {e}",
                        o.peer
                    );
                    sockets.push(o.socket);
                }
            }
            parked.push(o.parked);
        }
        let body = Final { sockets }.encode();
        let frame = migrate::frame(&body);
        let sent = time::timeout(self.config.handover_timeout, async {
            stream.write_all(&frame).await?;
            stream.shutdown().await
        })
        .await;
        for p in parked {
            p.discard();
        }
        match sent {
            Ok(Ok(())) => info!(
                "migrate: left {} at generation {generation}: sent the final state ({} bytes) to {to}, discarded {count} connections, standing by",
                self.config.workload,
                frame.len()
            ),
            Ok(Err(e)) => info!(
                "migrate: left {} at generation {generation}: the final state did not reach {to} ({e}), discarded {count} connections, standing by",
                self.config.workload
            ),
            Err(_) => info!(
                "migrate: left {} at generation {generation}: the final state did not reach {to} in time, discarded {count} connections, standing by",
                self.config.workload
            ),
        }
    }

    /// No left in time: the move did not happen, and the room goes on here.
    pub(super) fn outgoing_deadline(&mut self, now: Instant) {
        if let Some(out) = self.outgoing.take_if(|o| o.deadline <= now) {
            let count = out.connections.len();
            self.resume_all(out.connections);
            info!(
                "migrate: no left within {} ms: resumed {count} connections here",
                self.config.outcome_timeout.as_millis()
            );
        }
    }

    /// At shutdown: the parked connections are let go silently (the move may have
    /// happened).
    pub(super) fn drop_outgoing(&mut self) {
        if let Some(out) = self.outgoing.take() {
            info!(
                "migrate: shutting down during a handover: discarded {} parked connections",
                out.connections.len()
            );
        }
    }
}
