//! The simulated agents together: their client endpoints (a few UDP sockets shared by many
//! connections), the ramp that joins them at a controlled pace, the command channel to each,
//! and shutdown.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::agent::{Agent, AgentError, Command, Credentials, MapSummary, Shared};

/// Attempts per join. A join whose QUIC handshake or hello did not make it (a datagram
/// dropped under load, the coordinator's hello timeout) is tried again with a new key, as a
/// real agent would retry; the retries are counted.
const JOIN_ATTEMPTS: u32 = 5;

/// How the agents are brought up.
#[derive(Debug, Clone)]
pub struct RampPlan {
    /// Agents to join.
    pub agents: usize,
    /// How they come online.
    pub kind: RampKind,
    /// Client endpoints (UDP sockets) the connections are spread over.
    pub client_endpoints: usize,
    /// Joins in flight at once.
    pub concurrency: usize,
    /// Joins started per second at most; `None`: as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Receive and send buffer asked for each client socket, in bytes (the kernel caps it
    /// at `net.core.rmem_max` / `wmem_max` and doubles it).
    pub socket_buffer: usize,
    /// Print progress to standard error.
    pub progress: bool,
}

/// Why the fleet could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A client socket or endpoint could not be made.
    #[error("client endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    /// Agents failed to join.
    #[error("{failed} of {agents} agents could not join; the first failure: {first}")]
    Join {
        /// How many failed.
        failed: usize,
        /// How many were tried.
        agents: usize,
        /// The first error.
        first: AgentError,
    },
}

/// How agents come online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampKind {
    /// Every agent joins and stays connected. Each join is a change sent to every agent
    /// already connected: N²/2 deltas in all.
    Live,
    /// Every agent enrolls (joins, and disconnects after its welcome), then every agent
    /// connects with its node credentials, as a fleet does after a coordinator restart.
    /// Those connections change no map, so they cause no delta; each still gets a full map.
    Enroll,
}

/// The ramp, measured.
#[derive(Debug, Clone)]
pub struct Ramp {
    /// From the first join started to the last agent's first full map.
    pub duration: Duration,
    /// With [`RampKind::Enroll`]: how long enrolling every agent took.
    pub enrolled: Option<Duration>,
    /// Per agent, the start that brought it online: connect, handshake, hello, welcome and
    /// full map (the join with [`RampKind::Live`], the connection after enrolling with
    /// [`RampKind::Enroll`]).
    pub latency: Vec<Duration>,
}

/// The running agents.
pub struct Fleet {
    shared: Arc<Shared>,
    commands: Vec<mpsc::Sender<Command>>,
    tasks: JoinSet<Result<(), AgentError>>,
    endpoints: Vec<quinn::Endpoint>,
}

/// A client endpoint on 127.0.0.1 with large socket buffers, trusting only the certificate
/// whose SHA-256 is `fingerprint`. Must be called inside a tokio runtime.
///
/// # Errors
/// The socket cannot be made or the fingerprint is not one.
pub fn client_endpoint(
    fingerprint: &str,
    buffer: usize,
) -> Result<quinn::Endpoint, std::io::Error> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps the size, and a smaller buffer only means more drops
    // (which the report shows).
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.set_nonblocking(true)?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?;
    let config = meshlink_coordinator::pin::client_config(fingerprint)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The underlay endpoint agent `index` reports at join: a distinct documentation-range
/// address (198.18.0.0/15) with the WireGuard port.
pub fn join_endpoint(index: usize) -> SocketAddr {
    let i = u32::try_from(index).unwrap_or(u32::MAX);
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i & 0x1_ffff));
    SocketAddr::from((ip, 51820))
}

/// Reports how an agent's start went, then runs its loop on `inbox`.
async fn start_loop(
    agent: Result<Agent, AgentError>,
    started: Instant,
    reported: Reported,
    inbox: Option<mpsc::Receiver<Command>>,
) -> Result<(), AgentError> {
    match (agent, inbox) {
        (Ok(agent), Some(inbox)) => {
            let _ = reported.send(Ok(started.elapsed()));
            drop(reported);
            agent.run(inbox).await
        }
        (Ok(_), None) => {
            let _ = reported.send(Err(AgentError::Protocol("started twice".into())));
            Ok(())
        }
        (Err(e), _) => {
            // Reported through the channel; the task has nothing left to say.
            let _ = reported.send(Err(e));
            Ok(())
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or [`JOIN_ATTEMPTS`] are used up;
/// connection failures and timeouts are tried again after a second, and counted.
async fn with_retries<T, F, Fut>(
    shared: &Shared,
    index: usize,
    mut attempt: F,
) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AgentError>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(e @ (AgentError::Connection(_) | AgentError::Timeout)) if tries < JOIN_ATTEMPTS => {
                tracing::info!(agent = index, tries, "failed: {e}; trying again");
                shared
                    .board
                    .counters
                    .join_retries
                    .fetch_add(1, Ordering::Relaxed);
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// One pass over every agent index: starts a task per agent (at most `plan.concurrency`
/// unfinished, at most `plan.rate` started per second) and waits until each has reported
/// once through the channel it is given. A task may go on running after it reported.
struct Phase<'a> {
    plan: &'a RampPlan,
    name: &'static str,
    shared: &'a Shared,
}

/// What a task of a [`Phase`] reports: how long its part took, or why it failed.
type Reported = mpsc::UnboundedSender<Result<Duration, AgentError>>;

impl Phase<'_> {
    async fn run<F, Fut>(
        &self,
        tasks: &mut JoinSet<Result<(), AgentError>>,
        mut task: F,
    ) -> Result<Vec<Duration>, FleetError>
    where
        F: FnMut(usize, OwnedSemaphorePermit, Reported) -> Fut,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let plan = self.plan;
        let permits = Arc::new(Semaphore::new(plan.concurrency.max(1)));
        let (report_tx, mut report_rx) = mpsc::unbounded_channel();
        let mut pace = plan.rate.filter(|r| *r > 0.0).map(|r| {
            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            i
        });
        let start = Instant::now();
        let udp_start = crate::sys::udp_drops();
        let step = (plan.agents / 10).max(100);
        let mut latency = Vec::with_capacity(plan.agents);
        let mut failures: Vec<AgentError> = Vec::new();
        let mut done: usize = 0;
        let mut record =
            |result: Result<Duration, AgentError>| {
                done += 1;
                match result {
                    Ok(d) => latency.push(d),
                    Err(e) => failures.push(e),
                }
                if plan.progress && (done.is_multiple_of(step) || done == plan.agents) {
                    eprintln!(
                    "  {} {done}/{} in {:.1} s (RSS {} MiB, {} retries, {} UDP datagrams dropped)",
                    self.name,
                    plan.agents,
                    start.elapsed().as_secs_f64(),
                    crate::sys::memory().rss >> 20,
                    self.shared.board.counters.join_retries.load(Ordering::Relaxed),
                    crate::sys::udp_drops().since(&udp_start).rcvbuf_errors,
                );
                }
            };
        // Counted here as well as in `record`, which holds `done` while it lives.
        let mut received = 0;
        for index in 0..plan.agents {
            if let Some(p) = pace.as_mut() {
                p.tick().await;
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            while let Ok(r) = report_rx.try_recv() {
                received += 1;
                record(r);
            }
            tasks.spawn(task(index, permit, report_tx.clone()));
        }
        drop(report_tx);
        // Every task reports once; a task that goes on running may keep its sender.
        while received < plan.agents {
            let Some(r) = report_rx.recv().await else {
                break;
            };
            received += 1;
            record(r);
        }
        if !failures.is_empty() {
            return Err(FleetError::Join {
                failed: failures.len(),
                agents: plan.agents,
                first: failures.swap_remove(0),
            });
        }
        Ok(latency)
    }
}

impl Fleet {
    /// Brings `plan.agents` agents online with the token secret `token`, as `plan.kind`
    /// says, and starts each one's loop. Returns when every agent has its first full map.
    ///
    /// # Errors
    /// [`FleetError`]. The agents already up are then aborted (their tasks belong to the
    /// fleet, which is dropped).
    pub async fn ramp(
        shared: Arc<Shared>,
        plan: &RampPlan,
        fingerprint: &str,
        token: &str,
    ) -> Result<(Fleet, Ramp), FleetError> {
        let endpoints = (0..plan.client_endpoints.max(1))
            .map(|_| client_endpoint(fingerprint, plan.socket_buffer))
            .collect::<Result<Vec<_>, _>>()?;
        let mut commands = Vec::with_capacity(plan.agents);
        let mut inboxes = Vec::with_capacity(plan.agents);
        for _ in 0..plan.agents {
            let (tx, rx) = mpsc::channel(4);
            commands.push(tx);
            inboxes.push(Some(rx));
        }
        let mut fleet = Fleet {
            shared: shared.clone(),
            commands,
            tasks: JoinSet::new(),
            endpoints,
        };
        let endpoint_of = |index: usize| fleet.endpoints[index % fleet.endpoints.len()].clone();
        let endpoints: Vec<quinn::Endpoint> = (0..plan.agents).map(endpoint_of).collect();
        let start = Instant::now();
        let mut enrolled = None;
        let latency = match plan.kind {
            RampKind::Live => {
                let phase = Phase {
                    plan,
                    name: "joined",
                    shared: &shared,
                };
                phase
                    .run(&mut fleet.tasks, |index, permit, reported| {
                        let shared = shared.clone();
                        let endpoint = endpoints[index].clone();
                        let token = token.to_string();
                        let inbox = inboxes[index].take();
                        async move {
                            let t = Instant::now();
                            let agent = with_retries(&shared, index, || {
                                let endpoints = vec![join_endpoint(index)];
                                Agent::join(
                                    shared.clone(),
                                    endpoint.clone(),
                                    index,
                                    &token,
                                    endpoints,
                                )
                            })
                            .await;
                            drop(permit);
                            start_loop(agent, t, reported, inbox).await
                        }
                    })
                    .await?
            }
            RampKind::Enroll => {
                let creds: Arc<Mutex<Vec<Option<Credentials>>>> =
                    Arc::new(Mutex::new(vec![None; plan.agents]));
                let phase = Phase {
                    plan,
                    name: "enrolled",
                    shared: &shared,
                };
                let mut enroll_tasks = JoinSet::new();
                phase
                    .run(&mut enroll_tasks, |index, permit, reported| {
                        let shared = shared.clone();
                        let endpoint = endpoints[index].clone();
                        let token = token.to_string();
                        let creds = creds.clone();
                        async move {
                            let t = Instant::now();
                            let enrolled = with_retries(&shared, index, || {
                                Agent::enroll(
                                    &endpoint,
                                    shared.server(index),
                                    &token,
                                    vec![join_endpoint(index)],
                                    shared.offers,
                                )
                            })
                            .await;
                            drop(permit);
                            let _ = reported.send(enrolled.map(|c| {
                                creds.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(c);
                                t.elapsed()
                            }));
                            Ok(())
                        }
                    })
                    .await?;
                enrolled = Some(start.elapsed());
                let phase = Phase {
                    plan,
                    name: "connected",
                    shared: &shared,
                };
                phase
                    .run(&mut fleet.tasks, |index, permit, reported| {
                        let shared = shared.clone();
                        let endpoint = endpoints[index].clone();
                        let inbox = inboxes[index].take();
                        let creds = creds.lock().unwrap_or_else(|p| p.into_inner())[index].take();
                        async move {
                            let t = Instant::now();
                            let Some(creds) = creds else {
                                return Err(AgentError::Protocol("not enrolled".into()));
                            };
                            let agent = with_retries(&shared, index, || {
                                Agent::connect(
                                    shared.clone(),
                                    endpoint.clone(),
                                    index,
                                    creds.clone(),
                                )
                            })
                            .await;
                            drop(permit);
                            start_loop(agent, t, reported, inbox).await
                        }
                    })
                    .await?
            }
        };
        Ok((
            fleet,
            Ramp {
                duration: start.elapsed(),
                enrolled,
                latency,
            },
        ))
    }

    /// Tells agent `index` to report `endpoints`; returns the instant the report was handed
    /// to QUIC, or `None` when the agent is gone.
    pub async fn report_endpoints(
        &self,
        index: usize,
        endpoints: Vec<SocketAddr>,
    ) -> Option<Instant> {
        let (sent, at) = oneshot::channel();
        self.commands[index]
            .send(Command::ReportEndpoints { endpoints, sent })
            .await
            .ok()?;
        at.await.ok()
    }

    /// Every agent's map summary (`None` for agents that are gone), asked one after another.
    pub async fn describe(&self) -> Vec<Option<MapSummary>> {
        let mut out = Vec::with_capacity(self.commands.len());
        for tx in &self.commands {
            let (reply, answer) = oneshot::channel();
            out.push(match tx.send(Command::Describe(reply)).await {
                Ok(()) => answer.await.ok(),
                Err(_) => None,
            });
        }
        out
    }

    /// The local UDP ports of the agents' client sockets.
    pub fn local_ports(&self) -> Vec<u16> {
        self.endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }

    /// How many agents there are.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Closes every session and endpoint, and waits (a little) for the agents to end.
    /// Returns the agents that ended with an error, with the error.
    pub async fn stop(mut self) -> Vec<AgentError> {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for conn in self.shared.board.take_connections() {
            conn.close(0u32.into(), b"benchmark done");
        }
        self.commands.clear();
        let mut errors = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(r) = self.tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    errors.push(e);
                }
            }
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
        for e in &self.endpoints {
            e.close(0u32.into(), b"benchmark done");
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
        errors
    }
}
