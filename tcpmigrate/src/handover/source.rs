//! The source's side of a handover: freeze the paused connections, ship them with the
//! application's state, and either let them go on `left` (after sending the final frame) or
//! resume them here.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time;
use tracing::info;

use super::wire::{self, Connection, Final, Reply};
use super::{
    millis, to_tokio, Application, Event, Gone, Migrator, Outcome, Paused, Request, Resumed,
};
use crate::{freeze, Frozen, MigrateError, Parked};

/// A connection frozen for a handover: parked here (silent), to be shipped with its
/// session.
#[derive(Debug)]
pub struct Outbound<S> {
    parked: Parked,
    socket: Frozen,
    peer: SocketAddr,
    /// What the application keeps of it; shipped as [`Application::encode_session`] makes
    /// it.
    pub session: S,
}

impl<S> Outbound<S> {
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection goes on here, as if it had not been frozen (to be served again, or
    /// closed). When the socket refuses to leave repair mode the connection is gone (logged).
    ///
    /// # Errors
    /// [`Gone`] with the session, when it cannot be resumed.
    pub fn resume(self) -> Result<Paused<S>, Gone<S>> {
        let peer = self.peer;
        match self.parked.resume().and_then(to_tokio) {
            Ok(stream) => Ok(Paused {
                stream,
                peer,
                session: self.session,
            }),
            Err(e) => {
                info!("migrate: {peer}: cannot resume: {e}");
                Err(Gone {
                    peer,
                    session: self.session,
                })
            }
        }
    }
}

/// The paused connections once frozen, for the application to look over before they are
/// shipped ([`Migrator::hand_over`]'s `prepare`).
#[derive(Debug)]
pub struct Freeze<S> {
    /// Frozen, in the order they were given.
    pub frozen: Vec<Outbound<S>>,
    /// No longer established (their clients closed them before the freeze): they end here.
    pub gone: Vec<Gone<S>>,
}

/// What the application ships: its state, and the frozen connections it hands over (those
/// it leaves out it has resumed or closed itself).
pub struct Shipment<A: Application> {
    /// The application's own state.
    pub state: A::State,
    /// The connections, each with its session.
    pub connections: Vec<Outbound<A::Session>>,
}

/// A handover out that the destination took: waiting for `event=left`.
#[derive(Debug)]
pub(super) struct Outgoing<S> {
    to: String,
    connections: Vec<Outbound<S>>,
    /// The handover connection, for the final frame.
    stream: TcpStream,
    /// When to give up waiting for `event=left` and resume here.
    pub(super) deadline: Instant,
}

/// What became of a paused connection at the freeze.
enum Freezing<S> {
    Frozen(Outbound<S>),
    /// Its client closed it (or it failed): it is gone.
    Gone(Gone<S>),
    /// Freezing failed; the connection is as it was.
    Failed {
        paused: Paused<S>,
        error: MigrateError,
    },
}

/// Freezes one paused connection. `freeze` takes the socket even when it fails, so it is
/// given a second descriptor of it: on failure the first one carries on.
fn freeze_one<S>(p: Paused<S>) -> Freezing<S> {
    let Paused {
        stream,
        peer,
        session,
    } = p;
    let Ok(stream) = stream.into_std() else {
        return Freezing::Gone(Gone { peer, session });
    };
    let copy = match stream.try_clone() {
        Ok(copy) => copy,
        Err(source) => {
            let error = MigrateError::Socket {
                step: "duplicate the socket",
                source,
            };
            return back_to_tokio(stream, peer, session, error);
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
                session,
            })
        }
        Err(MigrateError::NotEstablished(_)) => Freezing::Gone(Gone { peer, session }),
        Err(error) => back_to_tokio(stream, peer, session, error),
    }
}

fn back_to_tokio<S>(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    session: S,
    error: MigrateError,
) -> Freezing<S> {
    match TcpStream::from_std(stream) {
        Ok(stream) => Freezing::Failed {
            paused: Paused {
                stream,
                peer,
                session,
            },
            error,
        },
        Err(_) => Freezing::Gone(Gone { peer, session }),
    }
}

/// Why [`freeze_all`] stopped, and the connections it did not freeze (the failed one
/// first), as they were.
struct Unfrozen<S> {
    error: String,
    connections: Vec<Paused<S>>,
}

/// Freezes every paused connection, in order, and stops at the first failure other than a
/// closed connection.
fn freeze_all<S>(paused: Vec<Paused<S>>) -> (Freeze<S>, Option<Unfrozen<S>>) {
    let mut out = Freeze {
        frozen: Vec::with_capacity(paused.len()),
        gone: Vec::new(),
    };
    let mut rest = paused.into_iter();
    while let Some(p) = rest.next() {
        match freeze_one(p) {
            Freezing::Frozen(o) => out.frozen.push(o),
            Freezing::Gone(g) => out.gone.push(g),
            Freezing::Failed { paused, error } => {
                let error = format!("freeze {}: {error}", paused.peer);
                let mut connections = vec![paused];
                connections.extend(rest);
                return (out, Some(Unfrozen { error, connections }));
            }
        }
    }
    (out, None)
}

/// Every frozen connection goes on here (into `back`).
fn resume_all<S>(outbound: Vec<Outbound<S>>, back: &mut Resumed<S>) {
    for o in outbound {
        match o.resume() {
            Ok(paused) => back.connections.push(paused),
            Err(gone) => back.gone.push(gone),
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
    let body = wire::read_frame(&mut stream, wire::MAX_REPLY)
        .await
        .map_err(|e| format!("the reply from {destination}: {e}"))?;
    let reply = Reply::decode(&body).map_err(|e| format!("the reply from {destination}: {e}"))?;
    Ok((stream, reply))
}

impl<A: Application> Migrator<A> {
    /// Answers [`super::Event::HandOver`]: freezes `paused` (every connection, stopped at a
    /// clean point), lets the application look them over (`prepare`: it gets the frozen and
    /// the gone ones and returns what to ship), ships them to the destination and answers the
    /// agent. On any failure before the destination says ready, every connection is resumed
    /// and given back ([`Outcome::Failed`]) and the agent is answered with the error.
    ///
    /// New clients should wait meanwhile: this returns once the destination answered, within
    /// [`super::Config::handover_timeout`] of sending.
    pub async fn hand_over(
        &mut self,
        request: Request,
        paused: Vec<Paused<A::Session>>,
        prepare: impl FnOnce(Freeze<A::Session>) -> Shipment<A>,
    ) -> Outcome<A::Session> {
        let Request {
            generation,
            to,
            address,
            at,
        } = request;
        if self.outgoing.is_some() {
            let error = "a handover is already under way".to_string();
            info!(
                "migrate: handover to {to} failed: {error}; resumed {} connections here",
                paused.len()
            );
            self.answer(generation, Some(error));
            return Outcome::Failed(Resumed {
                connections: paused,
                gone: Vec::new(),
            });
        }
        let (freeze, failure) = freeze_all(paused);
        if let Some(Unfrozen { error, connections }) = failure {
            let mut back = Resumed {
                connections,
                gone: freeze.gone,
            };
            resume_all(freeze.frozen, &mut back);
            info!(
                "migrate: handover to {to} failed: {error}; resumed {} connections here",
                back.connections.len()
            );
            self.answer(generation, Some(error));
            return Outcome::Failed(back);
        }
        let Shipment { state, connections } = prepare(freeze);
        info!(
            "migrate: froze {} connections in {:.1} ms",
            connections.len(),
            millis(at.elapsed())
        );
        let body = wire::State {
            format: A::FORMAT.to_string(),
            workload: self.config.workload.clone(),
            generation,
            state: A::encode_state(&state),
            connections: connections
                .iter()
                .map(|o| Connection {
                    socket: o.socket.clone(),
                    session: A::encode_session(&o.session),
                })
                .collect(),
        }
        .encode();
        let destination = SocketAddr::new(address, self.handover_port);
        let sent = Instant::now();
        let result = if body.len() > wire::MAX_MESSAGE {
            Err(format!(
                "the state is {} bytes, over the limit of {}",
                body.len(),
                wire::MAX_MESSAGE
            ))
        } else {
            let bind = self.holder.as_ref().map(|(_, ip)| *ip);
            match time::timeout(
                self.config.handover_timeout,
                send_state(bind, destination, &wire::frame(&body)),
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
                    connections.len(),
                    body.len() + 4,
                    millis(sent.elapsed())
                );
                self.outgoing = Some(Outgoing {
                    to,
                    connections,
                    stream,
                    deadline: Instant::now() + self.config.outcome_timeout,
                });
                self.answer(generation, None);
                Outcome::HandedOver
            }
            Err(e) => {
                let mut back = Resumed::default();
                resume_all(connections, &mut back);
                info!(
                    "migrate: handover to {to} failed: {e}; resumed {} connections here",
                    back.connections.len()
                );
                self.answer(generation, Some(e));
                Outcome::Failed(back)
            }
        }
    }

    /// The source stopped answering for the address: the parked sockets' state is read again
    /// (with what they took in since the freeze; nothing reaches them any more) and sent as
    /// the final frame, the sockets are discarded, and the application is told to forget the
    /// connections.
    pub(super) fn left(&mut self, out: Outgoing<A::Session>, generation: u64) {
        let Outgoing {
            to,
            connections,
            mut stream,
            ..
        } = out;
        let count = connections.len();
        let mut sockets = Vec::with_capacity(count);
        let mut sessions = Vec::with_capacity(count);
        for o in connections {
            // Read in repair mode: nothing is sent (no window probe), so the client hears
            // only from the destination.
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
            o.parked.discard();
            sessions.push(o.session);
        }
        self.events.push_back(Event::Released(sessions));
        let frame = wire::frame(&Final { sockets }.encode());
        let timeout = self.config.handover_timeout;
        let workload = self.config.workload.clone();
        tokio::spawn(async move {
            let sent = time::timeout(timeout, async {
                stream.write_all(&frame).await?;
                stream.shutdown().await
            })
            .await;
            let what = match sent {
                Ok(Ok(())) => format!("sent the final state ({} bytes) to {to}", frame.len()),
                Ok(Err(e)) => format!("the final state did not reach {to} ({e})"),
                Err(_) => format!("the final state did not reach {to} in time"),
            };
            info!("migrate: left {workload} at generation {generation}: {what}, discarded {count} connections, standing by");
        });
    }

    /// No left in time: the move did not happen, and the connections go on here.
    pub(super) fn outgoing_deadline(&mut self, now: Instant) {
        if let Some(out) = self.outgoing.take_if(|o| o.deadline <= now) {
            let count = out.connections.len();
            let mut back = Resumed::default();
            resume_all(out.connections, &mut back);
            info!(
                "migrate: no left within {} ms: resumed {count} connections here",
                self.config.outcome_timeout.as_millis()
            );
            self.events.push_back(Event::Resume(back));
        }
    }

    /// The coordinator called the move off: the connections go on here.
    pub(super) fn abort_outgoing(&mut self) {
        if let Some(out) = self.outgoing.take() {
            let count = out.connections.len();
            let mut back = Resumed::default();
            resume_all(out.connections, &mut back);
            info!("migrate: handover called off: resumed {count} connections here");
            self.events.push_back(Event::Resume(back));
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
