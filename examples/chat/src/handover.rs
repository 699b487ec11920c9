//! Live migration of the room: it moves to another server with its clients' TCP connections
//! (same ports, no reconnect). The flow (registering with the agent, the handover
//! connections, freezing, shipping, held restores, the final frame, and what happens when
//! something fails) is [`meshlink_tcp_migrate::handover`]'s; here is only the chat's part:
//!
//! - on a handover, pause every connection task at a clean point ([`Connections::pause`]);
//! - look the frozen members over before they are shipped: a client that closed its
//!   connection leaves the room (`* nick left`), a member the room evicted meanwhile or with
//!   more output waiting than a handover carries is dropped as too slow, and each member's
//!   outbox is drained into its pending output (after the departures, so that those lines
//!   travel too);
//! - serve what comes back (a failed handover, no `left`) or arrives, members rejoining
//!   without a `joined` line; forget the members handed over for good.
//!
//! While connections are parked here, new clients wait in the accept backlog. What travels
//! per member is in [`crate::migrate`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tracing::{debug, info};

pub use meshlink_tcp_migrate::handover::{listen, Config};
use meshlink_tcp_migrate::handover::{
    Event, Freeze, Gone, Migrator, Outbound, Outcome, Resumed, Shipment, StartError,
};

use crate::migrate::{Chat, MAX_PENDING};
use crate::server::{Connections, ServerConfig, Session};

/// Why a migrating server stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listener's address cannot be read.
    #[error("the listener: {0}")]
    Listen(io::Error),
    /// The migration could not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Serves the room on `listener` (see [`listen`]) and takes part in the workload's live
/// migrations: registered with the agent, taking handovers on `handovers` and sending them
/// to the destination's address at the same port. Returns when `shutdown` completes, after
/// telling the clients `* server shutting down`.
///
/// # Errors
/// [`RunError`], before serving.
pub async fn run(
    listener: TcpListener,
    handovers: TcpListener,
    server: ServerConfig,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let listen: SocketAddr = listener.local_addr().map_err(RunError::Listen)?;
    let mut connections = Connections::new(server);
    connections.announce(&listener);
    let mut migrator = Migrator::<Chat>::start(config, listen, handovers)?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept(), if !migrator.parked() => {
                connections.accepted(accepted).await;
            }
            () = connections.reap() => {}
            event = migrator.next() => on_event(&mut migrator, &mut connections, event).await,
        }
    }
    // Whatever is under way ends silently: a move may have happened.
    migrator.shutdown();
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

async fn on_event(
    migrator: &mut Migrator<Chat>,
    connections: &mut Connections,
    event: Event<Chat>,
) {
    match event {
        Event::HandOver(request) => {
            let paused = connections.pause().await;
            let outcome = migrator
                .hand_over(request, paused, |freeze| look_over(connections, freeze))
                .await;
            if let Outcome::Failed(back) = outcome {
                take_back(connections, back);
            }
        }
        Event::Resume(back) => take_back(connections, back),
        Event::Released(sessions) => {
            for session in sessions {
                if let (Some(nick), Some(m)) = (&session.nick, &session.membership) {
                    connections.room().leave(m.id, nick, false);
                }
            }
        }
        Event::Arrived(arrival) => {
            for paused in arrival.connections {
                connections.resume(paused);
            }
            connections.mark_resumed();
        }
    }
}

/// The frozen members, looked over before they are shipped: who left goes, who is too slow
/// is dropped, and what waits in the outboxes becomes pending output.
fn look_over(connections: &mut Connections, freeze: Freeze<Session>) -> Shipment<Chat> {
    let Freeze { frozen, gone } = freeze;
    for g in gone {
        left(connections, g);
    }
    let mut kept = Vec::with_capacity(frozen.len());
    for mut o in frozen {
        if was_evicted(&mut o.session) {
            too_slow(connections, o);
        } else {
            kept.push(o);
        }
    }
    // Outboxes are drained once every departure is announced, so that the others' pending
    // output has the announcements.
    drain_outboxes(&mut kept);
    let (mut kept, over): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .partition(|o| o.session.pending.len() <= MAX_PENDING);
    if !over.is_empty() {
        for o in over {
            too_slow(connections, o);
        }
        drain_outboxes(&mut kept);
    }
    Shipment {
        state: (),
        connections: kept,
    }
}

/// Connections that go on here after all: served again, the ones that could not go on
/// leaving the room.
fn take_back(connections: &mut Connections, back: Resumed<Session>) {
    for paused in back.connections {
        connections.resume(paused);
    }
    for g in back.gone {
        left(connections, g);
    }
    connections.mark_resumed();
}

/// A connection that ended during a handover: its member leaves the room.
fn left(connections: &Connections, g: Gone<Session>) {
    match (g.session.nick, g.session.membership) {
        (Some(nick), Some(m)) => {
            connections.room().leave(m.id, &nick, true);
            info!("{nick} left");
        }
        _ => debug!("{} left before NICK", g.peer),
    }
}

/// Drops a frozen member that reads too slowly: it goes live here and is closed.
fn too_slow(connections: &Connections, o: Outbound<Session>) {
    if let (Some(nick), Some(m)) = (&o.session.nick, &o.session.membership) {
        connections.room().leave(m.id, nick, true);
        info!("{nick} disconnected: too slow");
    }
    drop(o.resume());
}

/// Whether the room evicted the member while it was paused.
fn was_evicted(session: &mut Session) -> bool {
    session.membership.as_mut().is_some_and(|m| {
        matches!(
            m.evicted.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        )
    })
}

/// Moves what waits in each member's outbox to its pending output.
fn drain_outboxes(outbound: &mut [Outbound<Session>]) {
    for o in outbound {
        let session = &mut o.session;
        if let Some(m) = &mut session.membership {
            while let Ok(line) = m.outbox.try_recv() {
                session.pending.extend_from_slice(line.as_bytes());
            }
        }
    }
}
