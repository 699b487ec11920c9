//! The destination's side of a handover: take a state in from the holder only, restore its
//! connections held, answer ready, and on `arrived` (with the source's final frame) make them
//! live and serve them; without an arrival, let them go.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time;
use tracing::{debug, info};

use meshlink_tcp_migrate::{restore_held, Frozen, Held, MigrateError};

use super::{read_frame, to_tokio, Node, ACCEPT_PAUSE};
use crate::migrate::{self, Final, Reply, State};
use crate::protocol::Nick;
use crate::server::{millis, Paused, Session};

/// A connection restored at the destination, held until the arrival.
#[derive(Debug)]
struct Inbound {
    held: Held,
    socket: Frozen,
    nick: Option<Nick>,
    unread: Vec<u8>,
    pending: Vec<u8>,
}

/// The source's final frame, as far as it came.
#[derive(Debug)]
enum Last {
    /// Not yet.
    Waiting,
    /// The sockets as they were when the source left.
    Got(Vec<Frozen>),
}

/// A handover in that this server answered ready to: waiting for `event=arrived`.
#[derive(Debug)]
pub(super) struct Incoming {
    id: u64,
    generation: u64,
    from: String,
    connections: Vec<Inbound>,
    last: Last,
    arrived: bool,
    /// The end of the wait for the arrival, or after it for the final frame.
    pub(super) deadline: Instant,
}

/// What the tasks reading handover connections tell the loop.
#[derive(Debug)]
pub(super) enum Received {
    /// A state, or why none could be read.
    State {
        peer: SocketAddr,
        stream: TcpStream,
        bytes: usize,
        state: Result<State, String>,
    },
    /// The final frame of handover `id`, or why it did not come.
    Final {
        id: u64,
        last: Result<Final, String>,
    },
}

/// A held connection goes live, served by tokio.
fn go(held: Held) -> Result<TcpStream, MigrateError> {
    held.go().and_then(to_tokio)
}

/// Closes held connections silently: the move did not happen here.
fn discard(connections: Vec<Inbound>) {
    for c in connections {
        c.held.discard();
    }
}

/// Checks that the final frame speaks of the same connections, in order.
fn check_final(inc: &Incoming, last: Final) -> Result<Vec<Frozen>, String> {
    for (i, (fresh, c)) in last.sockets.iter().zip(&inc.connections).enumerate() {
        if fresh.local != c.socket.local || fresh.peer != c.socket.peer {
            return Err(format!(
                "sockets[{i}]: {} to {} is not the connection {} to {}",
                fresh.local, fresh.peer, c.socket.local, c.socket.peer
            ));
        }
    }
    Ok(last.sockets)
}

impl Node {
    /// A connection on the handover port: read it if it comes from the holder.
    pub(super) async fn on_handover_connection(
        &mut self,
        accepted: io::Result<(TcpStream, SocketAddr)>,
    ) {
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("migrate: accepting a handover failed: {e}");
                time::sleep(ACCEPT_PAUSE).await;
                return;
            }
        };
        let from_holder = self
            .holder
            .as_ref()
            .is_some_and(|(_, ip)| ip.to_canonical() == peer.ip().to_canonical());
        if !from_holder {
            info!(
                "migrate: handover from {peer} refused: not the holder ({})",
                self.holder_text()
            );
            return;
        }
        if self.receiving {
            info!("migrate: handover from {peer} refused: another one is being received");
            return;
        }
        self.receiving = true;
        let inbound = self.inbound.clone();
        let timeout = self.config.receive_timeout;
        tokio::spawn(async move {
            let mut stream = stream;
            let (bytes, state) =
                match time::timeout(timeout, read_frame(&mut stream, migrate::MAX_MESSAGE)).await {
                    Ok(Ok(body)) => (
                        body.len() + 4,
                        State::decode(&body).map_err(|e| e.to_string()),
                    ),
                    Ok(Err(e)) => (0, Err(e.to_string())),
                    Err(_) => (
                        0,
                        Err(format!("no whole state within {} ms", timeout.as_millis())),
                    ),
                };
            let _ = inbound.send(Received::State {
                peer,
                stream,
                bytes,
                state,
            });
        });
    }

    /// A state read (taken in or refused), or a final frame.
    pub(super) fn on_inbound(&mut self, received: Received) {
        match received {
            Received::State {
                peer,
                stream,
                bytes,
                state,
            } => {
                self.receiving = false;
                match state.and_then(|state| self.take_in(state, bytes, peer)) {
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
                match last.and_then(|last| check_final(&inc, last)) {
                    Ok(sockets) => {
                        let changed = sockets
                            .iter()
                            .zip(&inc.connections)
                            .filter(|(s, c)| **s != c.socket)
                            .count();
                        info!(
                            "migrate: final state from {}: {changed} of {} connections took in data after the freeze",
                            inc.from,
                            sockets.len()
                        );
                        inc.last = Last::Got(sockets);
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
        state: State,
        bytes: usize,
        peer: SocketAddr,
    ) -> Result<(u64, usize), String> {
        if state.workload != self.config.workload {
            return Err(format!(
                "workload: {:?}, this server takes {:?}",
                state.workload, self.config.workload
            ));
        }
        for (i, c) in state.connections.iter().enumerate() {
            let local = c.socket.local;
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
        let sockets: Vec<&Frozen> = state.connections.iter().map(|c| &c.socket).collect();
        let mut restored = Vec::with_capacity(sockets.len());
        let mut failure = None;
        for (i, held) in Self::restore_batch(&sockets).into_iter().enumerate() {
            match held {
                Ok(held) => restored.push(held),
                Err(e) if failure.is_none() => {
                    failure = Some(format!("connections[{i}] ({}): {e}", sockets[i].peer));
                }
                Err(_) => {}
            }
        }
        if let Some(e) = failure {
            for held in restored {
                held.discard();
            }
            return Err(e);
        }
        let connections: Vec<Inbound> = state
            .connections
            .into_iter()
            .zip(restored)
            .map(|(c, held)| Inbound {
                held,
                socket: c.socket,
                nick: c.nick,
                unread: c.unread,
                pending: c.pending,
            })
            .collect();
        info!(
            "migrate: restored {} connections held from {} ({peer}), {bytes} bytes, in {:.1} ms",
            connections.len(),
            state.from,
            millis(started.elapsed())
        );
        let id = self.next_id;
        self.next_id += 1;
        let count = connections.len();
        self.incoming = Some(Incoming {
            id,
            generation: state.generation,
            from: state.from,
            connections,
            last: Last::Waiting,
            arrived: false,
            deadline: Instant::now() + self.config.outcome_timeout,
        });
        Ok((id, count))
    }

    /// Restores each socket, held. `restore_held` binds beside the listener on the same port.
    fn restore_batch(sockets: &[&Frozen]) -> Vec<Result<Held, MigrateError>> {
        sockets.iter().map(|socket| restore_held(socket)).collect()
    }

    /// Answers a handover connection; after ready (to handover `id` of `count`
    /// connections), reads its final frame.
    fn reply(&self, mut stream: TcpStream, reply: Reply, handover: Option<(u64, usize)>) {
        let inbound = self.inbound.clone();
        let timeout = self.config.handover_timeout;
        // The source sends the final frame after its left, which comes within its own
        // outcome timeout; this bound is a backstop.
        let final_timeout =
            self.config.outcome_timeout + self.config.final_wait + self.config.receive_timeout;
        tokio::spawn(async move {
            let frame = migrate::frame(&reply.encode());
            let replied = time::timeout(timeout, stream.write_all(&frame)).await;
            let Some((id, count)) = handover else { return };
            let last = match replied {
                Ok(Ok(())) => match time::timeout(
                    final_timeout,
                    read_frame(&mut stream, migrate::MAX_MESSAGE),
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

    /// The held connections go live, restored again first where the final frame says they
    /// took in data after the freeze, and are served here.
    fn go_live(&mut self, inc: Incoming) {
        let started = Instant::now();
        let Incoming {
            generation,
            from,
            connections,
            last,
            ..
        } = inc;
        let last = match last {
            Last::Got(sockets) => sockets,
            Last::Waiting => Vec::new(),
        };
        let mut helds = Vec::with_capacity(connections.len());
        let mut states = Vec::with_capacity(connections.len());
        for (i, c) in connections.into_iter().enumerate() {
            match last.get(i).filter(|fresh| **fresh != c.socket) {
                Some(fresh) => {
                    // The old copy goes first: two sockets cannot hold one connection's
                    // addresses.
                    c.held.discard();
                    helds.push(None);
                    states.push((fresh.clone(), c.nick, c.unread, c.pending));
                }
                None => {
                    helds.push(Some(c.held));
                    states.push((c.socket, c.nick, c.unread, c.pending));
                }
            }
        }
        let changed: Vec<usize> = (0..helds.len()).filter(|&i| helds[i].is_none()).collect();
        let fresh: Vec<&Frozen> = changed.iter().map(|&i| &states[i].0).collect();
        let restored = Self::restore_batch(&fresh);
        for (&i, held) in changed.iter().zip(restored) {
            match held {
                Ok(held) => helds[i] = Some(held),
                Err(e) => info!("migrate: {}: cannot restore again: {e}", states[i].0.peer),
            }
        }
        let mut resumed = 0;
        for (held, (socket, nick, unread, pending)) in helds.into_iter().zip(states) {
            let Some(held) = held else { continue };
            match go(held) {
                Ok(stream) => {
                    self.connections.resume(Paused {
                        stream,
                        peer: socket.peer,
                        session: Session {
                            nick,
                            membership: None,
                            unread,
                            pending,
                        },
                    });
                    resumed += 1;
                }
                Err(e) => info!("migrate: {}: cannot go live: {e}", socket.peer),
            }
        }
        self.connections.mark_resumed();
        info!(
            "migrate: arrived {} at generation {generation}: resumed {resumed} connections from {from} in {:.1} ms",
            self.config.workload,
            millis(started.elapsed())
        );
    }

    /// `event=arrived`: the held connections go live once the source's final frame is in
    /// (or `final_wait` has passed).
    pub(super) fn arrived(&mut self, generation: u64) {
        match self.incoming.take() {
            Some(mut inc) if generation >= inc.generation => {
                if let Last::Got(_) = inc.last {
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
