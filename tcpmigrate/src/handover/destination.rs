//! The destination's side of a handover: take a state in from the holder only, restore its
//! connections held, answer ready, and on `arrived` (with the source's final frame) make them
//! live and give them to the application; without an arrival, let them go.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time;
use tracing::{debug, info};

use super::wire::{self, Final, FormatError, Reply};
use super::{millis, to_tokio, Application, Arrival, Event, Migrator, Paused, ACCEPT_PAUSE};
use crate::{restore_held, Frozen, Held};

/// A connection restored at the destination, held until the arrival.
#[derive(Debug)]
struct Inbound<S> {
    held: Held,
    socket: Frozen,
    session: S,
}

/// The source's final frame, as far as it came.
#[derive(Debug)]
enum Last {
    /// Not yet.
    Waiting,
    /// In: the held copies caught up with it.
    Got,
}

/// A handover in that this server answered ready to: waiting for `event=arrived`.
pub(super) struct Incoming<A: Application> {
    id: u64,
    generation: u64,
    from: String,
    state: A::State,
    connections: Vec<Inbound<A::Session>>,
    last: Last,
    arrived: bool,
    /// The end of the wait for the arrival, or after it for the final frame.
    pub(super) deadline: Instant,
}

/// A state as read and decoded, before its connections are restored.
pub(super) struct Taken<A: Application> {
    generation: u64,
    state: A::State,
    connections: Vec<(Frozen, A::Session)>,
}

/// What the tasks reading handover connections tell the migrator.
pub(super) enum Received<A: Application> {
    /// A state from the holder `from`, or why none could be taken.
    State {
        from: String,
        peer: SocketAddr,
        stream: TcpStream,
        bytes: usize,
        taken: Result<Taken<A>, String>,
    },
    /// The final frame of handover `id`, or why it did not come.
    Final {
        id: u64,
        last: Result<Final, String>,
    },
}

/// Decodes a state frame's body for `workload`: the frame, then the application's bytes.
fn take<A: Application>(body: &[u8], workload: &str) -> Result<Taken<A>, FormatError> {
    let state = wire::State::decode(body)?;
    if state.format != A::FORMAT {
        return Err(FormatError::invalid(
            "format",
            format!("{:?}, this server takes {:?}", state.format, A::FORMAT),
        ));
    }
    if state.workload != workload {
        return Err(FormatError::invalid(
            "workload",
            format!("{:?}, this server takes {workload:?}", state.workload),
        ));
    }
    let app = A::decode_state(&state.state).map_err(|e| e.under("state"))?;
    let connections = state
        .connections
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            A::decode_session(&c.session)
                .map(|session| (c.socket, session))
                .map_err(|e| e.under(&format!("connections[{i}].session")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Taken {
        generation: state.generation,
        state: app,
        connections,
    })
}

/// Closes held connections silently: the move did not happen here.
fn discard<S>(connections: Vec<Inbound<S>>) {
    for c in connections {
        c.held.discard();
    }
}

/// Checks that the final frame speaks of the same connections, in order.
fn check_final<S>(connections: &[Inbound<S>], last: Final) -> Result<Vec<Frozen>, String> {
    for (i, (fresh, c)) in last.sockets.iter().zip(connections).enumerate() {
        if fresh.local != c.socket.local || fresh.peer != c.socket.peer {
            return Err(format!(
                "sockets[{i}]: {} to {} is not the connection {} to {}",
                fresh.local, fresh.peer, c.socket.local, c.socket.peer
            ));
        }
    }
    Ok(last.sockets)
}

impl<A: Application> Migrator<A> {
    /// A connection on the handover port: read it if it comes from the holder.
    pub(super) fn on_handover_connection(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("migrate: accepting a handover failed: {e}");
                self.accept_pause = Some(Instant::now() + ACCEPT_PAUSE);
                return;
            }
        };
        let from = match &self.holder {
            Some((name, ip)) if ip.to_canonical() == peer.ip().to_canonical() => name.clone(),
            _ => {
                info!(
                    "migrate: handover from {peer} refused: not the holder ({})",
                    self.holder_text()
                );
                return;
            }
        };
        if self.receiving {
            info!("migrate: handover from {peer} refused: another one is being received");
            return;
        }
        self.receiving = true;
        let inbound = self.inbound_tx.clone();
        let timeout = self.config.receive_timeout;
        let workload = self.config.workload.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let read = time::timeout(timeout, wire::read_frame(&mut stream, wire::MAX_MESSAGE));
            let (bytes, taken) = match read.await {
                Ok(Ok(body)) => (
                    body.len() + 4,
                    take::<A>(&body, &workload).map_err(|e| e.to_string()),
                ),
                Ok(Err(e)) => (0, Err(e.to_string())),
                Err(_) => (
                    0,
                    Err(format!("no whole state within {} ms", timeout.as_millis())),
                ),
            };
            let _ = inbound.send(Received::State {
                from,
                peer,
                stream,
                bytes,
                taken,
            });
        });
    }

    /// A state read (taken in or refused), or a final frame.
    pub(super) fn on_inbound(&mut self, received: Received<A>) {
        match received {
            Received::State {
                from,
                peer,
                stream,
                bytes,
                taken,
            } => {
                self.receiving = false;
                match taken.and_then(|taken| self.take_in(taken, &from, bytes, peer)) {
                    Ok(handover) => self.reply(stream, Reply::Ready, Some(handover)),
                    Err(e) => {
                        info!("migrate: handover from {peer} failed: {e}");
                        self.reply(stream, Reply::Refused(e), None);
                    }
                }
            }
            Received::Final { id, last } => {
                let Some(mut inc) = self.incoming.take_if(|inc| inc.id == id) else {
                    return;
                };
                match last.and_then(|last| check_final(&inc.connections, last)) {
                    Ok(sockets) => {
                        // What the source's sockets took in after the freeze goes into the
                        // held copies now, in place: they never go away, so a segment that
                        // reaches one meanwhile draws no reset.
                        let mut late = 0;
                        for (c, fresh) in inc.connections.iter_mut().zip(&sockets) {
                            match c.held.catch_up(fresh) {
                                Ok(0) => {}
                                Ok(_) => late += 1,
                                Err(e) => info!(
                                    "migrate: {}: cannot take in the late data: {e}",
                                    fresh.peer
                                ),
                            }
                            c.socket = fresh.clone();
                        }
                        info!(
                            "migrate: final state from {}: {late} of {} connections took in data after the freeze",
                            inc.from,
                            sockets.len()
                        );
                        inc.last = Last::Got;
                        if inc.arrived {
                            self.go_live(inc);
                        } else {
                            self.incoming = Some(inc);
                        }
                    }
                    Err(e) if inc.arrived => {
                        info!(
                            "migrate: no final state from {} ({e}): resuming with the state of the freeze",
                            inc.from
                        );
                        self.go_live(inc);
                    }
                    Err(e) => {
                        let count = inc.connections.len();
                        discard(inc.connections);
                        info!(
                            "migrate: the handover from {} ended before the arrival ({e}): discarded {count} held connections",
                            inc.from
                        );
                    }
                }
            }
        }
    }

    /// Restores a state's connections, held; returns the handover's id and its count of
    /// connections.
    fn take_in(
        &mut self,
        taken: Taken<A>,
        from: &str,
        bytes: usize,
        peer: SocketAddr,
    ) -> Result<(u64, usize), String> {
        for (i, (socket, _)) in taken.connections.iter().enumerate() {
            let local = socket.local;
            if local.port() != self.listen.port()
                || !(self.listen.ip().is_unspecified() || self.listen.ip() == local.ip())
            {
                return Err(format!(
                    "connections[{i}].socket.local: {local} is not this server's address {}",
                    self.listen
                ));
            }
        }
        if let Some(old) = self.incoming.take() {
            let count = old.connections.len();
            discard(old.connections);
            info!("migrate: a new handover replaces the one held from {}: discarded {count} held connections", old.from);
        }
        let started = Instant::now();
        let mut connections = Vec::with_capacity(taken.connections.len());
        for (i, (socket, session)) in taken.connections.into_iter().enumerate() {
            // `restore_held` binds beside the server's listener on the same port.
            match restore_held(&socket) {
                Ok(held) => connections.push(Inbound {
                    held,
                    socket,
                    session,
                }),
                Err(e) => {
                    discard(connections);
                    return Err(format!("connections[{i}] ({}): {e}", socket.peer));
                }
            }
        }
        info!(
            "migrate: restored {} connections held from {from} ({peer}), {bytes} bytes, in {:.1} ms",
            connections.len(),
            millis(started.elapsed())
        );
        let id = self.next_id;
        self.next_id += 1;
        let count = connections.len();
        self.incoming = Some(Incoming {
            id,
            generation: taken.generation,
            from: from.to_string(),
            state: taken.state,
            connections,
            last: Last::Waiting,
            arrived: false,
            deadline: Instant::now() + self.config.outcome_timeout,
        });
        Ok((id, count))
    }

    /// Answers a handover connection; after ready (to handover `id` of `count`
    /// connections), reads its final frame.
    fn reply(&self, mut stream: TcpStream, reply: Reply, handover: Option<(u64, usize)>) {
        let inbound = self.inbound_tx.clone();
        let timeout = self.config.handover_timeout;
        // The source sends the final frame after its left, which comes within its own
        // outcome timeout; this bound is a backstop.
        let final_timeout =
            self.config.outcome_timeout + self.config.final_wait + self.config.receive_timeout;
        tokio::spawn(async move {
            let frame = wire::frame(&reply.encode());
            let replied = time::timeout(timeout, stream.write_all(&frame)).await;
            let Some((id, count)) = handover else { return };
            let last = match replied {
                Ok(Ok(())) => match time::timeout(
                    final_timeout,
                    wire::read_frame(&mut stream, wire::MAX_MESSAGE),
                )
                .await
                {
                    Ok(Ok(body)) => Final::decode(&body, count).map_err(|e| e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no final state in time".to_string()),
                },
                Ok(Err(e)) => Err(format!("cannot answer ready: {e}")),
                Err(_) => Err("cannot answer ready in time".to_string()),
            };
            let _ = inbound.send(Received::Final { id, last });
        });
    }

    /// The held connections go live (caught up with the final frame when it came) and go to
    /// the application.
    fn go_live(&mut self, inc: Incoming<A>) {
        let started = Instant::now();
        let Incoming {
            generation,
            from,
            state,
            connections,
            ..
        } = inc;
        let mut live = Vec::with_capacity(connections.len());
        for c in connections {
            // Caught up already with the final frame, if it came.
            let (held, socket) = (c.held, &c.socket);
            match held.go().and_then(to_tokio) {
                Ok(stream) => live.push(Paused {
                    stream,
                    peer: socket.peer,
                    session: c.session,
                }),
                Err(e) => info!("migrate: {}: cannot go live: {e}", socket.peer),
            }
        }
        info!(
            "migrate: arrived {} at generation {generation}: resumed {} connections from {from} in {:.1} ms",
            self.config.workload,
            live.len(),
            millis(started.elapsed())
        );
        self.events.push_back(Event::Arrived(Arrival {
            from,
            state,
            connections: live,
        }));
    }

    /// `event=arrived`: the held connections go live once the source's final frame is in
    /// (or `final_wait` has passed).
    pub(super) fn arrived(&mut self, generation: u64) {
        match self.incoming.take() {
            Some(mut inc) if generation >= inc.generation => {
                if let Last::Got = inc.last {
                    self.go_live(inc);
                } else {
                    inc.arrived = true;
                    inc.deadline = Instant::now() + self.config.final_wait;
                    self.incoming = Some(inc);
                }
            }
            other => {
                self.incoming = other;
                info!(
                    "migrate: arrived {} at generation {generation}",
                    self.config.workload
                );
            }
        }
    }

    /// No arrival in time: the held connections are let go; or arrived, but no final frame
    /// in time: they go live with the state of the freeze.
    pub(super) fn incoming_deadline(&mut self, now: Instant) {
        let Some(inc) = self.incoming.take_if(|i| i.deadline <= now) else {
            return;
        };
        if inc.arrived {
            info!(
                "migrate: no final state from {} within {} ms: resuming with the state of the freeze",
                inc.from,
                self.config.final_wait.as_millis()
            );
            self.go_live(inc);
        } else {
            let count = inc.connections.len();
            discard(inc.connections);
            info!(
                "migrate: no arrival within {} ms: discarded {count} held connections",
                self.config.outcome_timeout.as_millis()
            );
        }
    }

    /// At shutdown: the held connections are let go silently.
    pub(super) fn drop_incoming(&mut self) {
        if let Some(inc) = self.incoming.take() {
            let count = inc.connections.len();
            discard(inc.connections);
            info!("migrate: shutting down: discarded {count} held connections");
        }
    }
}
