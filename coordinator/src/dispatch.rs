//! What the coordinator does with each message of an attached agent session, apart from how
//! it arrived: the QUIC server (`server.rs`) and the simulations in `tests/it/` both call
//! [`Service::on_agent_message`], so the simulations run the same dispatch as production.

use std::net::IpAddr;
use std::sync::Arc;

use meshlink_proto::control::{encode, ClientMessage, ServerMessage};
use meshlink_proto::NodeId;

use crate::handlers::ApiError;
use crate::hub::{Frame, FullMapAnswer};
use crate::service::Service;

/// Which session a message came on.
#[derive(Debug, Clone)]
pub struct SessionRef<'a> {
    /// The node.
    pub node: NodeId,
    /// Its network.
    pub network: &'a str,
    /// The address the session comes from.
    pub remote: IpAddr,
    /// The session's attachment to the hub (`Attached::serial`).
    pub serial: u64,
}

/// Why an agent's message ends its session.
#[derive(Debug, thiserror::Error)]
pub enum SessionFault {
    /// A handler refused what the agent asked (or failed).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The session's network is no longer loaded.
    #[error("the network is gone")]
    NetworkGone,
    /// A second hello.
    #[error("a second hello")]
    SecondHello,
}

impl Service {
    /// Handles one message of an attached session; returns the frame to write back at once,
    /// if any. A claim runs apart (it waits for this node's own `Prepared`): its answer goes
    /// through the session's hub queue.
    ///
    /// # Errors
    /// [`SessionFault`]: the session should end.
    pub async fn on_agent_message(
        self: &Arc<Self>,
        from: SessionRef<'_>,
        msg: ClientMessage,
    ) -> Result<Option<Frame>, SessionFault> {
        match msg {
            ClientMessage::Endpoints { endpoints } => {
                self.report_endpoints(from.node, from.remote, &endpoints)
                    .await?;
                Ok(None)
            }
            ClientMessage::Paths { paths } => {
                self.paths().record(from.node, paths, self.now());
                Ok(None)
            }
            ClientMessage::Talkers { workload, nodes } => {
                self.record_talkers(from.network, from.node, &workload, nodes);
                Ok(None)
            }
            // At most one answer per version: a repeated request is answered by nothing.
            ClientMessage::FullMapRequest => {
                match self
                    .hub()
                    .full_map_for(from.network, from.node, from.serial)
                {
                    FullMapAnswer::Send(frame) => Ok(Some(frame)),
                    FullMapAnswer::Nothing => Ok(None),
                    FullMapAnswer::NoNetwork => Err(SessionFault::NetworkGone),
                }
            }
            ClientMessage::Heartbeat {
                seq,
                version: applied,
            } => {
                let renewal = self.heartbeat(from.node, from.network).await;
                // The node's map has every change up to `applied`: the workloads it held
                // before one of them may go to their new holders.
                if let Some(v) = applied {
                    self.acknowledged(from.network, from.node, v);
                }
                if renewal.database > self.hub().version(from.network) {
                    // Another coordinator committed a change this one has not pushed yet:
                    // push it first, so that the holder has it before the lease counts.
                    if let Err(e) = self.follow(from.network).await {
                        tracing::debug!("cannot follow the store: {e}");
                    }
                }
                // Read after the renewal above: see `Service::unacknowledged_release`.
                let version = self.hub().version(from.network).unwrap_or(0).max(
                    self.unacknowledged_release(from.network, from.node)
                        .unwrap_or(0),
                );
                let answer = ServerMessage::Lease {
                    seq,
                    lease_ms: u64::try_from(renewal.lease.as_millis()).unwrap_or(u64::MAX),
                    // With shared leases, the database's version (at the renewal the lease
                    // is bounded by, while the database is away): a change another
                    // coordinator committed must reach the holder before the lease counts.
                    version: renewal.floor.map_or(version, |v| v.max(version)),
                    // What it holds and may answer for (see `Service::confirmed_for`).
                    confirmed: Some(self.confirmed_for(from.network, from.node)),
                };
                Ok(Some(encode(&answer).into()))
            }
            ClientMessage::Prepared {
                workload,
                generation,
            } => {
                self.prepared_here(from.node, from.network, &workload, generation)
                    .await;
                Ok(None)
            }
            ClientMessage::HandedOver {
                workload,
                generation,
                attempt,
                error,
            } => {
                let answer = error.map_or(Ok(()), Err);
                self.handover_answered_here(
                    from.node,
                    from.network,
                    &workload,
                    generation,
                    attempt,
                    answer,
                )
                .await;
                Ok(None)
            }
            ClientMessage::Claim { request, workload } => {
                let service = self.clone();
                let (node, network, remote) = (from.node, from.network.to_string(), from.remote);
                self.spawn(async move {
                    let msg = match service.claim(node, remote, &workload).await {
                        Ok(o) => ServerMessage::ClaimResult {
                            request,
                            generation: Some(o.workload.generation),
                            error: None,
                        },
                        Err(e) => ServerMessage::ClaimResult {
                            request,
                            generation: None,
                            error: Some(e.public_message()),
                        },
                    };
                    service.hub().send_to(&network, node, encode(&msg).into());
                });
                Ok(None)
            }
            ClientMessage::NextKey { public_key } => {
                self.next_key_announced(from.node, from.remote, public_key)
                    .await?;
                Ok(None)
            }
            ClientMessage::Hello(_) => Err(SessionFault::SecondHello),
        }
    }
}
