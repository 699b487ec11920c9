//! Live migrations: before a move commits, the holder's application hands its state over.
//!
//! ```text
//! migrate_workload ─> prepare the destination (tunnels up)
//!                  ─> Handover to the holder's agent ──> its application freezes its
//!                     connections, ships them to the destination's application
//!                  <─ HandedOver (or why not)        <── within handover_timeout
//!                  ─> commit (or nothing moves, with the application's reason)
//! ```
//!
//! The holder's session may be on another coordinator (shared store): the `Handover` goes
//! there as a [`PrepareNote`] with `handover_to` on the prepare channel, and the answer comes
//! back with `handed_over` on the prepared channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshlink_proto::control::ServerMessage;
use meshlink_proto::NodeId;
use tokio::sync::oneshot;

use crate::handlers::ApiError;
use crate::hub::Frame;
use crate::service::{answer_within, encode, PrepareKey, Service};
use crate::store::{NodeRecord, PrepareNote, WorkloadRecord, PREPARED_CHANNEL, PREPARE_CHANNEL};

/// Live migrations waiting for their holder's answer.
#[derive(Debug, Default)]
pub struct Waiting(Mutex<HashMap<PrepareKey, Vec<AnswerTx>>>);

/// Where one holder's answer goes: handed over, or why not.
type AnswerTx = oneshot::Sender<Result<(), String>>;

impl Waiting {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PrepareKey, Vec<AnswerTx>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Service {
    /// Asks `holder` to hand `w` over to `to` and waits (bounded) for its answer.
    ///
    /// # Errors
    /// [`ApiError::Conflict`] naming why the application did not hand over, or that it did
    /// not answer in time: nothing moves then.
    pub(crate) async fn ask_handover(
        &self,
        w: &WorkloadRecord,
        holder: NodeId,
        to: &NodeRecord,
    ) -> Result<Duration, ApiError> {
        let started = self.clock.instant();
        let generation = w.generation + 1;
        let key = (holder, w.name.clone(), generation);
        let (tx, rx) = oneshot::channel();
        self.live_migrations
            .lock()
            .entry(key.clone())
            .or_default()
            .push(tx);
        let asked = if self.hub().is_online(&w.network, holder) {
            self.send_handover(&w.network, holder, &w.name, generation, to.id)
        } else if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node: holder,
                network: w.network.clone(),
                workload: w.name.clone(),
                generation,
                warm: None,
                handover_to: Some(to.id),
                handed_over: None,
            };
            let payload = serde_json::to_string(&note).unwrap_or_default();
            store
                .notify(PREPARE_CHANNEL, &payload)
                .await
                .map_err(|e| format!("cannot reach the coordinator of the holder: {e}"))
        } else {
            Err("the holder is offline".to_string())
        };
        let answer = match asked {
            Ok(()) => {
                let deadline = self
                    .clock
                    .sleep_until(started + self.timing().handover_timeout);
                match answer_within(rx, deadline).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => Err("the wait for the holder's answer was dropped".to_string()),
                    Err(()) => Err(format!(
                        "the holder's application did not answer within {} ms",
                        self.timing().handover_timeout.as_millis()
                    )),
                }
            }
            Err(e) => Err(e),
        };
        {
            let mut waiting = self.live_migrations.lock();
            if let Some(waiters) = waiting.get_mut(&key) {
                waiters.retain(|t| !t.is_closed());
                if waiters.is_empty() {
                    waiting.remove(&key);
                }
            }
        }
        match answer {
            Ok(()) => {
                let took = self.clock.instant().saturating_duration_since(started);
                tracing::info!(workload = %w.name, to = %to.name, ms = took.as_millis(), "the holder's application handed over");
                Ok(took)
            }
            Err(why) => {
                tracing::info!(workload = %w.name, to = %to.name, "live migration refused: {why}");
                Err(ApiError::Conflict(format!(
                    "live migration of workload {} to {} did not happen: {why}",
                    w.name, to.name
                )))
            }
        }
    }

    /// Sends a `Handover` to a session here, if its agent takes part in live migrations.
    fn send_handover(
        &self,
        network: &str,
        holder: NodeId,
        workload: &str,
        generation: u64,
        to: NodeId,
    ) -> Result<(), String> {
        match self.hub().features_of(network, holder) {
            None => Err("the holder is offline".to_string()),
            Some(f) if !f.handover => {
                Err("the holder's agent is too old to take part in live migrations".to_string())
            }
            Some(_) => {
                let frame: Frame = encode(&ServerMessage::Handover {
                    workload: workload.to_string(),
                    generation,
                    to,
                })
                .into();
                if self.hub().send_to(network, holder, frame) {
                    Ok(())
                } else {
                    Err("the holder's session queue is full".to_string())
                }
            }
        }
    }

    /// Another coordinator asks for a `Handover` to a holder whose session may be here.
    pub(crate) fn handover_requested(self: &Arc<Self>, note: &PrepareNote, to: NodeId) {
        if !self.hub().is_online(&note.network, note.node) {
            return;
        }
        let sent = self.send_handover(
            &note.network,
            note.node,
            &note.workload,
            note.generation,
            to,
        );
        if let Err(why) = sent {
            // The waiting coordinator hears why at once rather than at its deadline.
            let service = Arc::clone(self);
            let note = note.clone();
            tokio::spawn(async move {
                service
                    .handover_answered_here(
                        note.node,
                        &note.network,
                        &note.workload,
                        note.generation,
                        Err(why),
                    )
                    .await;
            });
        }
    }

    /// A holder of this coordinator's sessions answered a `Handover`: wakes the migration
    /// waiting here, and (shared store) tells the other coordinators.
    pub async fn handover_answered_here(
        &self,
        node: NodeId,
        network: &str,
        workload: &str,
        generation: u64,
        answer: Result<(), String>,
    ) {
        self.handover_answered(node, workload, generation, answer.clone());
        if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node,
                network: network.to_string(),
                workload: workload.to_string(),
                generation,
                warm: None,
                handover_to: None,
                handed_over: Some(answer),
            };
            let payload = serde_json::to_string(&note).unwrap_or_default();
            if let Err(e) = store.notify(PREPARED_CHANNEL, &payload).await {
                tracing::debug!(node, "cannot pass on a handover's answer: {e}");
            }
        }
    }

    /// A holder's answer to a `Handover`, from any coordinator.
    pub fn handover_answered(
        &self,
        node: NodeId,
        workload: &str,
        generation: u64,
        answer: Result<(), String>,
    ) {
        let waiters = self
            .live_migrations
            .lock()
            .remove(&(node, workload.to_string(), generation));
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(answer.clone());
        }
    }
}
