//! Live migration on this node: applications that serve a workload register for it on the
//! userspace API (`handover=NAME`, see `meshlink_uapi::handover`) and hear who holds it, when
//! the coordinator asks this node to hand it over, and when this node starts or stops
//! answering for its address. Their answers go to the control session.
//!
//! ```text
//! uapi connection ─ register ─> Handovers <─ observe(map, held) ─ reconciler
//!        ^  events (bounded)        │  ask(handover) <─ control loop <─ coordinator
//!        └──────────────────────────┘  answers ─────> control loop ─> HandedOver
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use meshlink_proto::workload::Held;
use meshlink_proto::{Netmap, NodeId};
use meshlink_uapi::handover::AgentEvent;
use tokio::sync::mpsc;

/// Events queued for one application; one that lets more pile up is dropped.
const EVENTS_QUEUED: usize = 64;
/// Answers queued for the control loop.
const ANSWERS_QUEUED: usize = 16;

/// An application's answer to a handover, for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The workload.
    pub workload: String,
    /// The generation of the handover answered.
    pub generation: u64,
    /// The coordinator's attempt it answers.
    pub attempt: u64,
    /// Handed over, or why not.
    pub result: Result<(), String>,
}

/// An application's registration: its events, until it ends
/// ([`Handovers::unregister`]).
#[derive(Debug)]
pub struct Registration {
    /// Identifies it, for [`Handovers::unregister`].
    pub id: u64,
    /// What the agent tells the application.
    pub events: mpsc::Receiver<AgentEvent>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another application is registered for the workload.
    #[error("another application is registered for live migration of workload {0}")]
    Taken(String),
    /// Not a workload name.
    #[error("{0:?} is not a workload name")]
    BadName(String),
}

#[derive(Debug)]
struct App {
    id: u64,
    tx: mpsc::Sender<AgentEvent>,
}

/// What the applications were last told, and who they are.
#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    apps: HashMap<String, App>,
    /// Each workload's holder, by the map (generation, name and mesh address).
    holders: HashMap<String, (u64, Option<(String, IpAddr)>)>,
    /// What this node answers for, with generations.
    held: BTreeMap<String, u64>,
    /// Handovers passed to an application, by workload (a later request replaces an earlier
    /// one): until the workload leaves or the coordinator calls it off.
    asks: HashMap<String, Ask>,
    /// Workloads this node stopped answering for while the map still gave them to it (its
    /// lease ran out): told `left` again, as moved, once the map gives them elsewhere.
    lapsed: HashMap<String, u64>,
}

/// A handover passed to an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ask {
    generation: u64,
    attempt: u64,
    /// Whether the application answered (a second answer is dropped).
    answered: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Handovers {
    inner: Mutex<Inner>,
    answers: mpsc::Sender<Answer>,
    answers_rx: Mutex<Option<mpsc::Receiver<Answer>>>,
}

impl Default for Handovers {
    fn default() -> Self {
        let (answers, rx) = mpsc::channel(ANSWERS_QUEUED);
        Handovers {
            inner: Mutex::default(),
            answers,
            answers_rx: Mutex::new(Some(rx)),
        }
    }
}

impl Handovers {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an application for `workload`. It is told the holder at once (when known),
    /// and that this node answers for the workload if it does.
    ///
    /// # Errors
    /// [`RegisterError`]: another live registration has the workload, or the name is bad.
    pub fn register(&self, workload: &str) -> Result<Registration, RegisterError> {
        if workload.is_empty()
            || workload.len() > 64
            || !workload
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(RegisterError::BadName(workload.chars().take(80).collect()));
        }
        let mut inner = self.lock();
        if inner
            .apps
            .get(workload)
            .is_some_and(|app| !app.tx.is_closed())
        {
            return Err(RegisterError::Taken(workload.to_string()));
        }
        let (tx, events) = mpsc::channel(EVENTS_QUEUED);
        if let Some((generation, holder)) = inner.holders.get(workload) {
            let _ = tx.try_send(AgentEvent::Holder {
                workload: workload.to_string(),
                generation: *generation,
                holder: holder.clone(),
            });
        }
        if let Some(generation) = inner.held.get(workload) {
            let _ = tx.try_send(AgentEvent::Arrived {
                workload: workload.to_string(),
                generation: *generation,
            });
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.apps.insert(workload.to_string(), App { id, tx });
        Ok(Registration { id, events })
    }

    /// Ends registration `id` for `workload` (its connection closed).
    pub fn unregister(&self, workload: &str, id: u64) {
        let mut inner = self.lock();
        if inner.apps.get(workload).is_some_and(|a| a.id == id) {
            inner.apps.remove(workload);
        }
    }

    /// Passes the coordinator's handover to the application registered for `workload`.
    ///
    /// # Errors
    /// Why it cannot be passed on (no application registered, or it is not keeping up): the
    /// coordinator is told, and nothing moves.
    pub fn ask(
        &self,
        workload: &str,
        generation: u64,
        attempt: u64,
        to: String,
        address: IpAddr,
    ) -> Result<(), String> {
        let event = AgentEvent::Handover {
            workload: workload.to_string(),
            generation,
            to,
            address,
        };
        let mut inner = self.lock();
        let Some(app) = inner.apps.get(workload) else {
            return Err(format!(
                "no application on this node is registered for live migration of workload {workload}"
            ));
        };
        match app.tx.try_send(event) {
            Ok(()) => {
                let ask = Ask {
                    generation,
                    attempt,
                    answered: false,
                };
                inner.asks.insert(workload.to_string(), ask);
                Ok(())
            }
            Err(e) => {
                inner.apps.remove(workload);
                Err(format!(
                    "the application registered for workload {workload} is gone or not keeping up ({e})"
                ))
            }
        }
    }

    /// An application answered the handover of `workload` at `generation`: queued for the
    /// control loop with the attempt it answers. An answer to no handover asked (or already
    /// answered, or called off) is dropped, as is one beyond sixteen waiting (the coordinator
    /// then gives up at its deadline).
    pub fn answer(&self, workload: &str, generation: u64, result: Result<(), String>) {
        let attempt = {
            let mut inner = self.lock();
            match inner.asks.get_mut(workload) {
                Some(ask) if ask.generation == generation && !ask.answered => {
                    ask.answered = true;
                    ask.attempt
                }
                _ => {
                    tracing::info!(%workload, generation, "an answer to no handover asked; dropped");
                    return;
                }
            }
        };
        let answer = Answer {
            workload: workload.to_string(),
            generation,
            attempt,
            result,
        };
        if let Err(e) = self.answers.try_send(answer) {
            tracing::warn!("a handover answer was dropped: {e}");
        }
    }

    /// The coordinator called off the handover `attempt` of `workload` (answered or not):
    /// the application is told to carry on here. Returns whether it was the one asked.
    pub fn abort(&self, workload: &str, generation: u64, attempt: u64) -> bool {
        let mut inner = self.lock();
        let asked = inner
            .asks
            .get(workload)
            .is_some_and(|a| a.generation == generation && a.attempt == attempt);
        if !asked {
            return false;
        }
        inner.asks.remove(workload);
        let event = AgentEvent::Aborted {
            workload: workload.to_string(),
            generation,
        };
        if let Some(app) = inner.apps.get(workload) {
            if let Err(e) = app.tx.try_send(event) {
                tracing::warn!(%workload, "dropping the live-migration registration: {e}");
                inner.apps.remove(workload);
            }
        }
        true
    }

    /// The answers, for the control loop (taken once).
    pub fn take_answers(&self) -> Option<mpsc::Receiver<Answer>> {
        self.answers_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Tells the applications what changed since the last call: each workload's holder by
    /// `map`, and what this node (`me`) answers for (`held`).
    pub fn observe(&self, map: &Netmap, me: NodeId, held: &BTreeMap<String, Held>) {
        let mut inner = self.lock();
        let holders: HashMap<String, (u64, Option<(String, IpAddr)>)> = map
            .workloads
            .values()
            .map(|w| {
                let holder = w.holder.and_then(|id| peer(map, id));
                (w.name.clone(), (w.generation, holder))
            })
            .collect();
        let held: BTreeMap<String, u64> = held
            .iter()
            .map(|(name, h)| (name.clone(), h.generation))
            .collect();
        let mut events = Vec::new();
        for (name, (generation, holder)) in &holders {
            if inner.holders.get(name) != Some(&(*generation, holder.clone())) {
                events.push(AgentEvent::Holder {
                    workload: name.clone(),
                    generation: *generation,
                    holder: holder.clone(),
                });
            }
        }
        let mine = |name: &str| {
            map.workloads
                .get(name)
                .is_some_and(|w| w.holder == Some(me))
        };
        let mut lapsed = Vec::new();
        for (name, generation) in &inner.held {
            if held.get(name).is_none_or(|g| g != generation) {
                let moved = !mine(name);
                if !moved {
                    lapsed.push((name.clone(), *generation));
                }
                events.push(AgentEvent::Left {
                    workload: name.clone(),
                    generation: *generation,
                    moved,
                });
            }
        }
        // Left while still given here: moved, once the map gives them elsewhere; held
        // again: no longer lapsed.
        let gone: Vec<(String, u64)> = inner
            .lapsed
            .iter()
            .filter(|(name, _)| !mine(name.as_str()) || held.contains_key(name.as_str()))
            .map(|(n, g)| (n.clone(), *g))
            .collect();
        for (name, generation) in gone {
            inner.lapsed.remove(&name);
            if !held.contains_key(&name) {
                events.push(AgentEvent::Left {
                    workload: name,
                    generation,
                    moved: true,
                });
            }
        }
        inner.lapsed.extend(lapsed);
        // A handover is settled once its workload moved away.
        let moved_away: Vec<String> = inner
            .asks
            .keys()
            .filter(|name| !mine(name.as_str()))
            .cloned()
            .collect();
        for name in moved_away {
            inner.asks.remove(&name);
        }
        for (name, generation) in &held {
            if inner.held.get(name) != Some(generation) {
                events.push(AgentEvent::Arrived {
                    workload: name.clone(),
                    generation: *generation,
                });
            }
        }
        inner.holders = holders;
        inner.held = held;
        for event in events {
            let workload = event.workload().to_string();
            let Some(app) = inner.apps.get(&workload) else {
                continue;
            };
            if let Err(e) = app.tx.try_send(event) {
                tracing::warn!(%workload, "dropping the live-migration registration: {e}");
                inner.apps.remove(&workload);
            }
        }
    }
}

/// Whether node `me` may hand `workload` over at `generation`: the map gives it the workload
/// at the generation before, and it answers for it now (its lease is valid, the handover to
/// it confirmed). A stale request (after a reconnect, a lapsed lease) is refused.
///
/// # Errors
/// Why not, for the coordinator.
pub fn holds(
    map: &Netmap,
    held: &BTreeMap<String, Held>,
    me: NodeId,
    workload: &str,
    generation: u64,
) -> Result<(), String> {
    let w = map
        .workloads
        .get(workload)
        .ok_or_else(|| format!("workload {workload} is not in this node's map"))?;
    if w.holder != Some(me) || w.generation + 1 != generation {
        return Err(format!(
            "this node's map does not give it workload {workload} at generation {}",
            generation.saturating_sub(1)
        ));
    }
    if !held.contains_key(workload) {
        return Err(format!(
            "this node does not answer for workload {workload} now"
        ));
    }
    Ok(())
}

/// A node's name and first mesh address, by the map.
pub fn peer(map: &Netmap, id: NodeId) -> Option<(String, IpAddr)> {
    let p = map.peers.get(&id)?;
    let address = p.addresses.first()?.addr();
    Some((p.name.clone(), address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::workload::WorkloadInfo;
    use meshlink_proto::{PeerInfo, PublicKey};

    fn map(holder: Option<NodeId>, generation: u64) -> Netmap {
        let mut m = Netmap::default();
        for (id, name) in [(1, "vm-a1"), (2, "vm-c1")] {
            m.peers.insert(
                id,
                PeerInfo {
                    node_id: id,
                    name: name.into(),
                    public_key: PublicKey([u8::try_from(id).unwrap(); 32]),
                    next_key: None,
                    addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
                    allowed_ips: vec![],
                    endpoints: vec![],
                    labels: BTreeMap::new(),
                    tags: vec![],
                    via: None,
                },
            );
        }
        m.workloads.insert(
            "chat".into(),
            WorkloadInfo {
                id: 1,
                name: "chat".into(),
                address: "100.64.50.10/32".parse().unwrap(),
                holder,
                generation,
                previous: None,
                candidates: vec![],
                grace_ms: None,
                tags: vec![],
                address6: None,
            },
        );
        m
    }

    fn held(generation: Option<u64>) -> BTreeMap<String, Held> {
        generation
            .map(|g| {
                (
                    "chat".to_string(),
                    Held {
                        address: "100.64.50.10/32".parse().unwrap(),
                        generation: g,
                    },
                )
            })
            .into_iter()
            .collect()
    }

    fn drain(r: &mut Registration) -> Vec<AgentEvent> {
        std::iter::from_fn(|| r.events.try_recv().ok()).collect()
    }

    #[test]
    fn a_registered_application_hears_the_holder_the_handover_and_the_switch() {
        let h = Handovers::default();
        h.observe(&map(Some(1), 4), 1, &held(Some(4)));
        let mut app = h.register("chat").unwrap();
        let holder = Some(("vm-a1".to_string(), "100.64.0.1".parse().unwrap()));
        assert_eq!(
            drain(&mut app),
            vec![
                AgentEvent::Holder {
                    workload: "chat".into(),
                    generation: 4,
                    holder: holder.clone()
                },
                AgentEvent::Arrived {
                    workload: "chat".into(),
                    generation: 4
                }
            ],
            "told at once what holds and that this node answers"
        );
        assert_eq!(
            h.register("chat").unwrap_err(),
            RegisterError::Taken("chat".into())
        );
        h.ask("chat", 5, 41, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap();
        assert!(
            matches!(&drain(&mut app)[..], [AgentEvent::Handover { generation: 5, to, .. }] if to == "vm-c1")
        );
        let mut answers = h.take_answers().unwrap();
        h.answer("chat", 4, Ok(()));
        assert!(
            answers.try_recv().is_err(),
            "not the generation asked: dropped"
        );
        h.answer("chat", 5, Ok(()));
        assert_eq!(
            answers.try_recv().unwrap(),
            Answer {
                workload: "chat".into(),
                generation: 5,
                attempt: 41,
                result: Ok(())
            },
            "the answer carries the attempt asked"
        );
        h.answer("chat", 5, Ok(()));
        assert!(
            answers.try_recv().is_err(),
            "answered once: a second is dropped"
        );
        // Nothing changed: nothing told.
        h.observe(&map(Some(1), 4), 1, &held(Some(4)));
        assert!(drain(&mut app).is_empty());
        // The move commits: the holder changes, then this node stops answering.
        h.observe(&map(Some(2), 5), 1, &held(Some(4)));
        h.observe(&map(Some(2), 5), 1, &held(None));
        assert_eq!(
            drain(&mut app),
            vec![
                AgentEvent::Holder {
                    workload: "chat".into(),
                    generation: 5,
                    holder: Some(("vm-c1".to_string(), "100.64.0.2".parse().unwrap()))
                },
                AgentEvent::Left {
                    workload: "chat".into(),
                    generation: 4,
                    moved: true
                }
            ]
        );
        assert!(h.take_answers().is_none(), "taken once");
        // A retry replaces the ask; the abort of the earlier attempt leaves it.
        h.ask("chat", 6, 42, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap();
        h.ask("chat", 6, 43, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap();
        assert!(!h.abort("chat", 6, 42));
        h.answer("chat", 6, Err("no".into()));
        assert_eq!(answers.try_recv().unwrap().attempt, 43);
        h.ask("chat", 7, 44, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap();
        assert!(h.abort("chat", 7, 44));
        h.answer("chat", 7, Ok(()));
        assert!(
            answers.try_recv().is_err(),
            "called off: the late answer is dropped"
        );
    }

    /// A lease that runs out while the map still gives the workload here is a `left` that
    /// is not a move; the move, if the map then gives it elsewhere, is told too. A handover
    /// called off (answered or not) is told to the application.
    #[test]
    fn a_lapsed_lease_is_no_move_and_an_abort_reaches_the_application() {
        let h = Handovers::default();
        h.observe(&map(Some(1), 4), 1, &held(Some(4)));
        let mut app = h.register("chat").unwrap();
        drain(&mut app);
        h.observe(&map(Some(1), 4), 1, &held(None));
        h.observe(&map(Some(1), 4), 1, &held(None));
        h.observe(&map(Some(2), 5), 1, &held(None));
        let lefts: Vec<(u64, bool)> = drain(&mut app)
            .into_iter()
            .filter_map(|e| match e {
                AgentEvent::Left {
                    generation, moved, ..
                } => Some((generation, moved)),
                _ => None,
            })
            .collect();
        assert_eq!(lefts, vec![(4, false), (4, true)]);
        // Held again after a lapse: no second left.
        h.observe(&map(Some(1), 6), 1, &held(Some(6)));
        h.observe(&map(Some(1), 6), 1, &held(None));
        h.observe(&map(Some(1), 6), 1, &held(Some(6)));
        h.observe(&map(Some(1), 6), 1, &held(Some(6)));
        assert_eq!(
            drain(&mut app)
                .iter()
                .filter(|e| matches!(e, AgentEvent::Left { .. }))
                .count(),
            1
        );
        h.ask("chat", 7, 70, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap();
        h.answer("chat", 7, Ok(()));
        assert!(!h.abort("chat", 7, 71), "another attempt");
        assert!(h.abort("chat", 7, 70), "answered, then called off");
        assert!(drain(&mut app).contains(&AgentEvent::Aborted {
            workload: "chat".into(),
            generation: 7
        }));
    }

    #[test]
    fn only_the_holder_that_answers_for_the_workload_hands_it_over() {
        let m = map(Some(1), 4);
        assert_eq!(holds(&m, &held(Some(4)), 1, "chat", 5), Ok(()));
        for (me, generation, held_now, says) in [
            (1, 6, Some(4), "generation 5"),
            (2, 5, Some(4), "generation 4"),
            (1, 5, None, "does not answer"),
        ] {
            let err = holds(&m, &held(held_now), me, "chat", generation).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
        assert!(holds(&m, &held(Some(4)), 1, "other", 5).is_err());
    }

    #[test]
    fn a_handover_without_an_application_is_refused_and_registrations_end() {
        let h = Handovers::default();
        let err = h
            .ask("chat", 5, 1, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("no application"), "{err}");
        let app = h.register("chat").unwrap();
        h.unregister("chat", app.id + 1);
        assert!(h.register("chat").is_err(), "another id ends nothing");
        h.unregister("chat", app.id);
        let again = h.register("chat").unwrap();
        drop(again.events);
        assert!(
            h.register("chat").is_ok(),
            "a closed registration is replaced"
        );
        assert!(matches!(
            h.register("bad name\n"),
            Err(RegisterError::BadName(_))
        ));
    }

    #[test]
    fn an_application_that_does_not_read_is_dropped_not_queued_without_end() {
        let h = Handovers::default();
        let _app = h.register("chat").unwrap();
        for g in 1..=(EVENTS_QUEUED as u64 + 1) {
            h.observe(&map(Some(1), g), 1, &BTreeMap::new());
        }
        let err = h
            .ask("chat", 99, 1, "vm-c1".into(), "100.64.0.2".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("no application"), "{err}");
    }
}
