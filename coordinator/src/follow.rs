//! Following the other coordinators that share the store (PostgreSQL): every change any of
//! them commits reaches this coordinator's sessions, in version order, none lost or doubled.
//!
//! The store logs what each version changed ([`crate::store::ChangeRecord`]). The hub's map
//! of a network is at some version; [`Service::follow`] replays the log from there, reading
//! the current record of each entity named, and queues the result as one delta. It runs
//! under the service's write lock, so it interleaves with this coordinator's own changes in
//! version order: a change committed here at version `v` while the hub is still before
//! `v - 1` (another coordinator committed in between) is published by replaying the log up
//! to `v`, never by skipping. A coordinator further behind than the log reaches reloads the
//! network's whole map and sends it whole.
//!
//! What wakes it: a PostgreSQL notification on [`crate::store::CHANGES_CHANNEL`] per commit
//! (see `run.rs`), and a poll of every network's version once a second, which also catches
//! notifications lost while the listening connection was down.

use std::collections::BTreeSet;

use meshlink_proto::{NetmapDelta, NodeId, PolicyChange};

use crate::handlers::nodes::{self, peer_info};
use crate::handlers::policy;
use crate::hub::CloseReason;
use crate::service::Service;
use crate::store::{
    Change, PrepareNote, StoreError, CHANGES_CHANNEL, PREPARED_CHANNEL, PREPARE_CHANNEL,
};

/// How many log rows are replayed into one delta at most.
const BATCH: u32 = 512;

impl Service {
    /// Brings this coordinator's map of `network` to the store's latest version, queuing
    /// what changed to its sessions. Loads a network created by another coordinator.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read; the map stays where it was.
    pub async fn follow(&self, network: &str) -> Result<(), StoreError> {
        let _w = self.lock_writes().await;
        self.catch_up_locked(network).await
    }

    /// [`Service::follow`] for every network whose version in the store differs from the
    /// hub's.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn follow_all(&self) -> Result<(), StoreError> {
        for net in self.store().networks().await? {
            // A network the hub does not have (`None`) is behind too.
            if self.hub().version(&net.name) < Some(net.version) {
                self.follow(&net.name).await?;
            }
        }
        Ok(())
    }

    /// [`Service::follow`] with the write lock already held.
    pub(crate) async fn catch_up_locked(&self, network: &str) -> Result<(), StoreError> {
        let Some(mut at) = self.hub().version(network) else {
            return self.reload_locked(network).await;
        };
        loop {
            let changes = self.store().changes_since(network, at, BATCH).await?;
            let (Some(first), Some(last)) = (changes.first(), changes.last()) else {
                return Ok(());
            };
            if first.version != at + 1 {
                tracing::warn!(
                    network,
                    at,
                    oldest = first.version,
                    "too far behind the change log: sending the whole map"
                );
                return self.reload_locked(network).await;
            }
            let mut delta = NetmapDelta {
                to_version: last.version,
                ..NetmapDelta::default()
            };
            let mut nodes_seen = BTreeSet::<NodeId>::new();
            let mut workloads_seen = BTreeSet::<String>::new();
            for c in &changes {
                match &c.change {
                    Change::Node(id) if nodes_seen.insert(*id) => {
                        match self.store().node(*id).await? {
                            Some(n) if !n.revoked => delta.upsert.push(peer_info(&n)),
                            Some(n) => {
                                delta.remove.push(*id);
                                self.close_removed(&n.network, *id, CloseReason::Revoked);
                            }
                            None => {
                                delta.remove.push(*id);
                                self.close_removed(network, *id, CloseReason::Deleted);
                            }
                        }
                    }
                    Change::Workload(name) if workloads_seen.insert(name.clone()) => {
                        match self.store().workload(network, name).await? {
                            Some(w) => {
                                if self
                                    .hub()
                                    .workload_generation(network, name)
                                    .is_some_and(|(id, _)| id != w.id)
                                {
                                    // Deleted and created again under its name meanwhile.
                                    self.deleted_elsewhere(network, name);
                                }
                                self.holder_changed(&w);
                                delta.upsert_workloads.push(self.info(&w));
                            }
                            None => {
                                self.deleted_elsewhere(network, name);
                                delta.remove_workloads.push(name.clone());
                            }
                        }
                    }
                    Change::Policy => {
                        delta.policy = Some(match policy::current(self.store(), network).await? {
                            Some(p) => PolicyChange::Set(p),
                            None => PolicyChange::Clear,
                        });
                    }
                    _ => {}
                }
            }
            self.hub().apply_delta_at(network, delta, self.instant());
            at = last.version;
        }
    }

    /// Replaces the hub's map of `network` with the store's and sends it whole.
    async fn reload_locked(&self, network: &str) -> Result<(), StoreError> {
        let Some(net) = self.store().network(network).await? else {
            return Ok(());
        };
        let members = self.store().nodes(Some(network)).await?;
        let wls = self.store().workloads(Some(network)).await?;
        let policy = policy::current(self.store(), network).await?;
        let mut map = nodes::netmap(net.version, &members, &wls, policy);
        for w in map.workloads.values_mut() {
            w.grace_ms = self.info_grace_ms();
        }
        // Workloads gone (or created again under their names) first, so that what
        // `holder_changed` records for the new ones stays theirs.
        for w in self.hub().network_workloads(network, None) {
            if !wls.iter().any(|x| x.name == w.name && x.id == w.id) {
                self.deleted_elsewhere(network, &w.name);
            }
        }
        for w in &wls {
            self.holder_changed(w);
        }
        let fanout = self.hub().reset_map(network, map);
        tracing::info!(
            network,
            version = net.version,
            sessions = fanout.sessions,
            "loaded the network's map from the store"
        );
        Ok(())
    }

    /// Closes the session of a node another coordinator removed, telling it why.
    fn close_removed(&self, network: &str, node: NodeId, reason: CloseReason) {
        let why = match reason {
            CloseReason::Revoked => "revoked",
            _ => "deleted",
        };
        let text = format!("node {node} was {why} by an operator");
        // This coordinator may have served the node: what it kept about it goes too.
        self.forget_node(node);
        if self.close_session(network, node, reason, text) {
            tracing::info!(
                node,
                network,
                "closing the session of a node {why} elsewhere"
            );
        }
    }
}

/// How often every network's version is compared with the store's, notifications or not.
pub const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Follows the other coordinators sharing the PostgreSQL database at `url` until `stop`
/// changes: listens on [`crate::store::CHANGES_CHANNEL`] (reconnecting when the connection
/// drops) and polls every [`POLL`].
pub async fn follow_postgres(
    service: std::sync::Arc<Service>,
    url: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use sqlx::postgres::PgListener;
    let mut listener: Option<PgListener> = None;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        if listener.is_none() {
            match PgListener::connect(&url).await {
                Ok(mut l) => match l
                    .listen_all([CHANGES_CHANNEL, PREPARE_CHANNEL, PREPARED_CHANNEL])
                    .await
                {
                    Ok(()) => {
                        listener = Some(l);
                        warned = false;
                        // Whatever was committed while nobody listened.
                        if let Err(e) = service.follow_all().await {
                            tracing::warn!("cannot follow the store: {e}");
                        }
                    }
                    Err(e) if !warned => {
                        tracing::warn!("cannot listen for changes: {e}");
                        warned = true;
                    }
                    Err(_) => {}
                },
                Err(e) if !warned => {
                    tracing::warn!("cannot listen for changes (retrying every second): {e}");
                    warned = true;
                }
                Err(_) => {}
            }
        }
        let note = async {
            match listener.as_mut() {
                Some(l) => Some(l.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = note => match n {
                Some(Ok(n)) => match n.channel() {
                    PREPARE_CHANNEL | PREPARED_CHANNEL => {
                        match serde_json::from_str::<PrepareNote>(n.payload()) {
                            Ok(note) if n.channel() == PREPARE_CHANNEL => {
                                service.prepare_requested(&note);
                            }
                            Ok(note) => match note.handed_over {
                                Some(answer) => {
                                    service.handover_answered(
                                        note.node,
                                        &note.workload,
                                        note.generation,
                                        note.attempt.unwrap_or(0),
                                        answer,
                                    );
                                }
                                None => {
                                    service.prepared(note.node, &note.workload, note.generation)
                                }
                            },
                            Err(e) => tracing::debug!("a malformed note on {}: {e}", n.channel()),
                        }
                    }
                    _ => {
                        if let Err(e) = service.follow(n.payload()).await {
                            tracing::warn!(network = n.payload(), "cannot follow the store: {e}");
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::warn!("lost the change notifications: {e}; reconnecting");
                    listener = None;
                }
                None => {}
            },
            _ = poll.tick() => {
                service.refresh_presence().await;
                if let Err(e) = service.follow_all().await {
                    tracing::debug!("cannot follow the store: {e}");
                }
            }
            _ = stop.changed() => return,
        }
    }
}
