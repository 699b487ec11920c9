//! Live migrations: before a move commits, the holder's application hands its state over.
//!
//! ```text
//! migrate_workload ─> prepare the destination (tunnels up)
//!                  ─> Handover{attempt} to the holder's agent ──> its application freezes
//!                     its connections, ships them to the destination's application
//!                  <─ HandedOver{attempt} (or why not)         <── within handover_timeout
//!                  ─> commit; on any failure after the Handover: HandoverAborted{attempt}
//! ```
//!
//! Each request has an attempt number of its own, so that a late answer to an earlier
//! request (timed out, refused) can never pass for the answer to a later one, and one live
//! migration of a workload runs at a time on a coordinator. The holder's session may be on
//! another coordinator (shared store): the `Handover` (and an abort) goes there as a
//! [`PrepareNote`] with `handover_to` (`abort`) on the prepare channel, and the answer comes
//! back with `handed_over` on the prepared channel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meshlink_proto::control::ServerMessage;
use meshlink_proto::NodeId;
use rand::Rng;
use tokio::sync::oneshot;

use crate::handlers::ApiError;
use crate::hub::Frame;
use crate::service::{answer_within, encode, Service};
use crate::store::{NodeRecord, PrepareNote, WorkloadRecord, PREPARED_CHANNEL, PREPARE_CHANNEL};

/// A handover waited for: (holder, workload, generation, attempt).
type AttemptKey = (NodeId, String, u64, u64);

/// Where one holder's answer goes: handed over, or why not.
type AnswerTx = oneshot::Sender<Result<(), String>>;

/// Live migrations under way on this coordinator.
#[derive(Debug, Default)]
pub struct Waiting(Mutex<Inner>);

#[derive(Debug, Default)]
pub(crate) struct Inner {
    answers: HashMap<AttemptKey, AnswerTx>,
    /// (network, workload) of every live migration under way here.
    busy: HashSet<(String, String)>,
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks a workload's live migration under way; the mark goes with it (any way out).
pub(crate) struct Busy<'a> {
    service: &'a Service,
    key: (String, String),
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.service.live_migrations.lock().busy.remove(&self.key);
    }
}

/// A handover asked of a holder, to call off (with its answer's wait) if the move does not
/// commit.
pub(crate) struct Asked {
    network: String,
    holder: NodeId,
    workload: String,
    generation: u64,
    attempt: u64,
}

impl Service {
    /// Marks `network`/`workload` as being migrated live here.
    ///
    /// # Errors
    /// [`ApiError::Conflict`] while another live migration of it is under way here.
    pub(crate) fn start_live_migration(
        &self,
        network: &str,
        workload: &str,
    ) -> Result<Busy<'_>, ApiError> {
        let key = (network.to_string(), workload.to_string());
        if !self.live_migrations.lock().busy.insert(key.clone()) {
            return Err(ApiError::Conflict(format!(
                "a live migration of workload {workload} is under way; try again once it is done"
            )));
        }
        Ok(Busy { service: self, key })
    }

    /// Asks `holder` to hand `w` over to `to` and waits (bounded) for its answer.
    ///
    /// # Errors
    /// [`ApiError::Conflict`] naming why the application did not hand over, or that it did
    /// not answer in time: nothing moves then (the holder is told to carry on).
    pub(crate) async fn ask_handover(
        &self,
        w: &WorkloadRecord,
        holder: NodeId,
        to: &NodeRecord,
    ) -> Result<(Duration, Asked), ApiError> {
        let started = self.clock.instant();
        let generation = w.generation + 1;
        let attempt: u64 = rand::thread_rng().gen();
        let key = (holder, w.name.clone(), generation, attempt);
        let (tx, rx) = oneshot::channel();
        self.live_migrations.lock().answers.insert(key.clone(), tx);
        let asked = Asked {
            network: w.network.clone(),
            holder,
            workload: w.name.clone(),
            generation,
            attempt,
        };
        let sent = if self.hub().is_online(&w.network, holder) {
            self.send_handover(&w.network, holder, &w.name, generation, to.id, attempt)
        } else if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node: holder,
                network: w.network.clone(),
                workload: w.name.clone(),
                generation,
                warm: None,
                handover_to: Some(to.id),
                attempt: Some(attempt),
                abort: false,
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
        let answer = match sent {
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
        self.live_migrations.lock().answers.remove(&key);
        match answer {
            Ok(()) => {
                let took = self.clock.instant().saturating_duration_since(started);
                tracing::info!(workload = %w.name, to = %to.name, ms = took.as_millis(), "the holder's application handed over");
                Ok((took, asked))
            }
            Err(why) => {
                tracing::info!(workload = %w.name, to = %to.name, "live migration refused: {why}");
                // The application may have frozen its connections, or answer late: it
                // carries on where it is.
                self.abort_handover(asked).await;
                Err(ApiError::Conflict(format!(
                    "live migration of workload {} to {} did not happen: {why}",
                    w.name, to.name
                )))
            }
        }
    }

    /// Tells the holder that the live migration `asked` will not commit.
    pub(crate) async fn abort_handover(&self, asked: Asked) {
        let msg = ServerMessage::HandoverAborted {
            workload: asked.workload.clone(),
            generation: asked.generation,
            attempt: asked.attempt,
        };
        if self.hub().is_online(&asked.network, asked.holder) {
            self.hub()
                .send_to(&asked.network, asked.holder, encode(&msg).into());
        } else if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node: asked.holder,
                network: asked.network,
                workload: asked.workload,
                generation: asked.generation,
                warm: None,
                handover_to: None,
                attempt: Some(asked.attempt),
                abort: true,
                handed_over: None,
            };
            let payload = serde_json::to_string(&note).unwrap_or_default();
            if let Err(e) = store.notify(PREPARE_CHANNEL, &payload).await {
                tracing::debug!("cannot pass on a handover's abort: {e}");
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
        attempt: u64,
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
                    attempt,
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

    /// Another coordinator asks for a `Handover` (or its abort) to a holder whose session may
    /// be here.
    pub(crate) fn handover_requested(self: &Arc<Self>, note: &PrepareNote) {
        if !self.hub().is_online(&note.network, note.node) {
            return;
        }
        let attempt = note.attempt.unwrap_or(0);
        if note.abort {
            let msg = ServerMessage::HandoverAborted {
                workload: note.workload.clone(),
                generation: note.generation,
                attempt,
            };
            self.hub()
                .send_to(&note.network, note.node, encode(&msg).into());
            return;
        }
        let Some(to) = note.handover_to else {
            return;
        };
        let sent = self.send_handover(
            &note.network,
            note.node,
            &note.workload,
            note.generation,
            to,
            attempt,
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
                        attempt,
                        Err(why),
                    )
                    .await;
            });
        }
    }

    /// A holder of this coordinator's sessions answered a `Handover`: wakes the migration
    /// waiting here for it, or (shared store) tells the other coordinators.
    pub async fn handover_answered_here(
        &self,
        node: NodeId,
        network: &str,
        workload: &str,
        generation: u64,
        attempt: u64,
        answer: Result<(), String>,
    ) {
        if self.handover_answered(node, workload, generation, attempt, answer.clone()) {
            return;
        }
        if let Some(store) = self.shared.get() {
            let note = PrepareNote {
                node,
                network: network.to_string(),
                workload: workload.to_string(),
                generation,
                warm: None,
                handover_to: None,
                attempt: Some(attempt),
                abort: false,
                handed_over: Some(answer),
            };
            let payload = serde_json::to_string(&note).unwrap_or_default();
            if let Err(e) = store.notify(PREPARED_CHANNEL, &payload).await {
                tracing::debug!(node, "cannot pass on a handover's answer: {e}");
            }
        }
    }

    /// A holder's answer to a `Handover`, from any coordinator: whether a migration here was
    /// waiting for it (an answer to no request here is dropped).
    pub fn handover_answered(
        &self,
        node: NodeId,
        workload: &str,
        generation: u64,
        attempt: u64,
        answer: Result<(), String>,
    ) -> bool {
        let waiter = self.live_migrations.lock().answers.remove(&(
            node,
            workload.to_string(),
            generation,
            attempt,
        ));
        match waiter {
            Some(tx) => {
                let _ = tx.send(answer);
                true
            }
            None => false,
        }
    }
}
