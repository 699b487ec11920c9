//! Start-up and shutdown: state directory, identity, admin token and store, then the QUIC
//! server (with the relay), the TLS/TCP server on the same address and port over TCP, and the
//! admin API as tasks sharing one [`Service`], and the reflexive address responder on a UDP
//! port beside the QUIC one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminContext};
use crate::config::StoreLocation;
use crate::config::{default_advertise, ReflectListen, Settings, TcpListen};
use crate::identity::{self, AdminToken, IdentityError, DATABASE_FILE};
use crate::reflect::{self, ReflectCounters, ReflectStats};
use crate::relay::Relay;
use crate::server::{self, ServerError};
use crate::service::{Service, SystemClock, Traversal, WorkloadTiming, ENDPOINT_TICK, STOP_LINGER};
use crate::stop_record;
use crate::store::{Backend, SqlStore, StoreError, TimedStore};
use crate::tcp;
use crate::telemetry;

/// Why the coordinator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory, TLS identity or admin token cannot be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The database cannot be opened or migrated.
    #[error("database {path}: {source}")]
    Store {
        /// The database file or URL (without its password).
        path: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The QUIC endpoint cannot be made.
    #[error(transparent)]
    Quic(#[from] ServerError),
    /// Relays are listed (`[[relays]]`) but the identity's key cannot sign their tickets.
    #[error("[[relays]]: {0}")]
    RelayTickets(meshlink_relay::ticket::KeyError),
    /// The TLS/TCP listener for agents cannot listen.
    #[error("cannot listen on TCP {addr} (tcp_listen): {source}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The reflexive address responder cannot listen.
    #[error("cannot listen on UDP {addr} (reflect_listen): {source}")]
    Reflect {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The admin API cannot listen.
    #[error("cannot listen on TCP {addr} (admin API): {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
}

/// A running coordinator. Dropping it without [`Coordinator::shutdown`] leaves its tasks
/// running until the runtime ends.
#[derive(Debug)]
pub struct Coordinator {
    /// Where the stop lease is recorded (alone, on SQLite: `stop_record`).
    state_dir: std::path::PathBuf,
    quic_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    reflect_addr: Option<SocketAddr>,
    relay: Option<Arc<Relay>>,
    reflect_counters: Arc<ReflectCounters>,
    advertise: String,
    fingerprint: String,
    admin_token: AdminToken,
    service: Arc<Service>,
    store: SqlStore,
    shutdown: watch::Sender<bool>,
    quic_task: JoinHandle<()>,
    tcp_task: Option<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    failover_task: JoinHandle<()>,
    endpoint_task: JoinHandle<()>,
    follow_task: Option<JoinHandle<()>>,
    reflect_task: Option<JoinHandle<()>>,
    /// Ends the relay sessions of removed nodes (a mesh of several).
    sweep_task: Option<JoinHandle<()>>,
}

/// Tries at a QUIC port that is free in TCP too, when the listen port is ephemeral.
const EPHEMERAL_TRIES: usize = 16;

/// How often silent workload holders are looked for.
const FAILOVER_CHECK: Duration = Duration::from_millis(50);
/// How often the relay sessions on a coordinator's port are checked against the nodes of the
/// maps: a node revoked or deleted keeps its relay sessions here at most this long.
const RELAY_SWEEP: Duration = Duration::from_secs(1);

/// How often the audit log is pruned.
const AUDIT_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The most audit entries kept, whatever their age: refused requests from anyone who can reach
/// the admin listener cannot grow the database without bound.
pub const AUDIT_KEPT: u64 = 1_000_000;

impl Coordinator {
    /// Prepares the state directory and starts serving.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn start(settings: &Settings) -> Result<Coordinator, StartError> {
        let dir = &settings.state_dir;
        // Before any metric is touched (handles made earlier would go nowhere).
        telemetry::install();
        identity::prepare_state_dir(dir)?;
        let id = identity::load_or_create_identity(dir)?;
        if id.created {
            tracing::info!(dir = %dir.display(), "made a new TLS identity");
        }
        let admin_token = identity::load_or_create_admin_token(dir)?;
        let (store, db) = match &settings.store {
            StoreLocation::Sqlite => {
                let file = dir.join(DATABASE_FILE);
                (
                    SqlStore::open_sqlite(&file).await,
                    file.display().to_string(),
                )
            }
            StoreLocation::Postgres(url) => (
                SqlStore::connect_postgres(url).await,
                settings.store.redacted(),
            ),
        };
        let store = store.map_err(|source| StartError::Store {
            path: db.clone(),
            source,
        })?;
        if store.backend() == Backend::Postgres {
            store
                .claim_identity(&id.fingerprint)
                .await
                .map_err(|source| StartError::Store {
                    path: db.clone(),
                    source,
                })?;
        }
        // Alone on SQLite, nobody renews a lease while this coordinator restarts: it grants a
        // longer one as it stops, and waits out what its predecessor recorded having granted.
        // Several share leases instead.
        let stop_lease = matches!(settings.store, StoreLocation::Sqlite)
            .then(|| WorkloadTiming::lone_stop_lease(settings.limits.workload_lease));
        let (previous_stop_left, previous_stop_longest) =
            stop_lease.map_or((Duration::ZERO, Duration::ZERO), |own| {
                stop_record::read(dir, SystemTime::now()).unwrap_or_else(|e| {
                    // Unknown: as long as this run's own stop lease could be.
                    tracing::warn!(
                        "{e}: counting the previous run's stop leases as this run's own ({} ms)",
                        own.as_millis()
                    );
                    (own, own)
                })
            });
        if stop_lease.is_some() {
            // Before any lease is granted: a crash of this run leaves the next one (whatever
            // its lease) waiting out this run's leases, and what is left of its predecessor's.
            if let Err(e) = stop_record::record_running(
                dir,
                SystemTime::now(),
                settings.limits.workload_lease,
                previous_stop_left,
            ) {
                tracing::warn!("{e}: a crash of this run may leave its leases unrecorded");
            }
        }
        let service = Arc::new(
            Service::load_with(
                // Every call of the service's timed for the metrics.
                Arc::new(TimedStore::new(store.clone())),
                Arc::new(SystemClock),
                settings.limits.session_queue,
                WorkloadTiming {
                    lease: settings.limits.workload_lease,
                    grace: settings.limits.workload_grace,
                    stop_lease,
                    previous_stop_left,
                    previous_stop_longest,
                    ..WorkloadTiming::default()
                },
            )
            .await
            .map_err(|source| StartError::Store {
                path: db.clone(),
                source,
            })?,
        );

        let (endpoint, quic_addr, tcp_listener) = bind_agent_listeners(&id, settings).await?;
        let tcp_addr = match &tcp_listener {
            Some((listener, addr)) => {
                Some(listener.local_addr().map_err(|source| StartError::Tcp {
                    addr: *addr,
                    source,
                })?)
            }
            None => None,
        };
        // Beside the QUIC address as configured (not as bound: port 0 stays ephemeral).
        let reflect_socket = match settings.reflect_listen.resolve(settings.listen) {
            Some(addr) => {
                let bind_err = |source| StartError::Reflect { addr, source };
                let socket = tokio::net::UdpSocket::bind(addr).await.map_err(bind_err)?;
                let bound = socket.local_addr().map_err(bind_err)?;
                Some((socket, bound))
            }
            None if settings.reflect_listen == ReflectListen::NextToListen => {
                return Err(StartError::Reflect {
                    addr: settings.listen,
                    source: std::io::Error::other(
                        "no port after the listen port: set reflect_listen, or off",
                    ),
                })
            }
            None => None,
        };
        let reflect_addr = reflect_socket.as_ref().map(|(_, a)| *a);
        let relay = settings
            .relay
            .then(|| Arc::new(Relay::new(settings.limits.relay_rate)));
        let advertise = settings
            .advertise
            .clone()
            .unwrap_or_else(|| default_advertise(quic_addr));
        // The same list, in the same order, from every coordinator of the mesh.
        let mut all = settings.coordinators.clone();
        if !all.contains(&advertise) {
            if !all.is_empty() {
                tracing::warn!(
                    %advertise,
                    coordinators = ?all,
                    "the advertised address is not in the coordinators' list: each coordinator \
                     must list every one, itself included, in the same order (or agents see \
                     them under other names)"
                );
            }
            all.push(advertise.clone());
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        // Relays are announced on the embedded relay's channel: without it, none. With it,
        // the `[[relays]]` or, in a mesh of several without them, every coordinator (whose
        // own port then serves relay sessions); with none of either, grants of none, so that
        // agents drop relays granted before (by another coordinator, or this one before its
        // configuration changed).
        let relay_port =
            crate::relay::serves_relay_sessions(settings.relay, &all, &settings.relays);
        let coordinator_relays = if relay_port {
            crate::relay::coordinator_relays(&all, &id.fingerprint)
        } else {
            Vec::new()
        };
        let listed: Vec<_> = settings
            .relays
            .iter()
            .chain(&coordinator_relays)
            .cloned()
            .collect();
        let grants = match (&relay, listed.is_empty()) {
            (Some(_), false) => {
                let issuer = meshlink_relay::ticket::Issuer::new(&id.key, settings.relay_ticket)
                    .map_err(StartError::RelayTickets)?;
                Some(Arc::new(crate::relay::Grants::new(issuer, listed.clone())))
            }
            (Some(_), true) => Some(Arc::new(crate::relay::Grants::none())),
            (None, _) => None,
        };
        let port = if relay_port {
            let verifier = meshlink_relay::ticket::Verifier::new(id.cert.clone())
                .map_err(StartError::RelayTickets)?;
            let tickets = Arc::new(Relay::new(settings.limits.relay_rate));
            // A node is at either (an agent opens its relay session here a moment after its
            // control session elsewhere, or here): each delivers through the other.
            if let Some(embedded) = &relay {
                embedded.also_deliver_through(&tickets);
                tickets.also_deliver_through(embedded);
            }
            Some(crate::relay::RelayPort {
                sessions: Arc::new(meshlink_relay::sessions::Sessions::new(
                    tickets,
                    verifier,
                    settings.limits.hello_timeout,
                    shutdown_rx.clone(),
                )),
                connections: Arc::new(crate::session::connections(&settings.limits)),
            })
        } else {
            None
        };
        let relaying = crate::relay::Relaying {
            relay: relay.clone(),
            grants,
            port,
        };
        // Tickets are checked offline; the nodes revoked or deleted since theirs was issued lose
        // their relay sessions here within a sweep (the hub's maps no longer have their keys).
        let sweep_task = relaying.port.as_ref().map(|port| {
            let (service, relay, mut stop) = (
                service.clone(),
                port.sessions.relay().clone(),
                shutdown_rx.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(RELAY_SWEEP);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => break,
                    }
                    if relay.routes() == 0 {
                        continue;
                    }
                    let keys = service.hub().keys();
                    let gone = relay.push_out(|key, network| {
                        keys.get(network).is_some_and(|k| k.contains(key))
                    });
                    if gone > 0 {
                        tracing::info!(nodes = gone, "relay sessions of removed nodes ended");
                    }
                }
            })
        });
        service.set_endpoint_pace(
            settings.limits.endpoint_interval,
            settings.limits.endpoint_burst,
        );
        service.set_traversal(Traversal {
            reflect_port: reflect_addr.map(|a| a.port()),
            relay: settings.relay,
        });
        let listener = TcpListener::bind(settings.admin_listen)
            .await
            .map_err(|source| StartError::Admin {
                addr: settings.admin_listen,
                source,
            })?;
        let admin_addr = listener.local_addr().map_err(|source| StartError::Admin {
            addr: settings.admin_listen,
            source,
        })?;
        let shutdown_rx_failover = shutdown_rx.clone();
        let shutdown_rx_endpoints = shutdown_rx.clone();
        let connections = Arc::new(crate::session::connections(&settings.limits));
        let admin_connections = connections.clone();
        let quic_task = tokio::spawn(server::run(
            endpoint,
            service.clone(),
            settings.limits.clone(),
            relaying.clone(),
            connections.clone(),
            shutdown_rx.clone(),
        ));
        let tcp_task = match tcp_listener {
            Some((listener, _)) => Some(tokio::spawn(tcp::run(
                listener,
                tcp::acceptor(&id, relaying.port.is_some())?,
                service.clone(),
                settings.limits.clone(),
                relaying.clone(),
                connections,
                shutdown_rx.clone(),
            ))),
            None => None,
        };
        let reflect_counters = Arc::new(ReflectCounters::default());
        let reflect_task = reflect_socket.map(|(socket, _)| {
            tokio::spawn(reflect::run(
                socket,
                reflect_counters.clone(),
                shutdown_rx.clone(),
            ))
        });
        let others: Vec<String> = settings
            .coordinators
            .iter()
            .filter(|c| **c != advertise)
            .cloned()
            .collect();
        service.set_coordinators(&advertise, all.clone());
        let ctx = AdminContext {
            admin_token: admin_token.value.clone(),
            quic_listen: quic_addr,
            advertise: advertise.clone(),
            others,
            fingerprint: id.fingerprint.clone(),
            started: Instant::now(),
            relay: relay.clone(),
            reflect: reflect_addr.map(|a| (a, reflect_counters.clone())),
            connections: Some(admin_connections),
            tcp_listen: tcp_addr,
            relays: settings.relays.clone(),
            coordinator_relays,
            relay_sessions: relaying.port.as_ref().map(|p| p.sessions.clone()),
        };
        let app = admin::router(service.clone(), ctx);
        let mut admin_rx = shutdown_rx;
        let admin_task = tokio::spawn(async move {
            let stop = async move {
                let _ = admin_rx.changed().await;
            };
            // The client's address goes into the audit log.
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!("admin API stopped: {e}");
            }
        });
        let failover_task = tokio::spawn({
            let service = service.clone();
            let mut stop = shutdown_rx_failover;
            async move {
                let mut tick = tokio::time::interval(FAILOVER_CHECK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => service.failover_tick().await,
                        _ = stop.changed() => break,
                    }
                }
            }
        });
        // Endpoint reports that waited their node's turn (see `crate::endpoint_pace`).
        let endpoint_task = tokio::spawn({
            let service = service.clone();
            let mut stop = shutdown_rx_endpoints;
            async move {
                let mut tick = tokio::time::interval(ENDPOINT_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => service.endpoint_tick().await,
                        _ = stop.changed() => break,
                    }
                }
            }
        });
        if matches!(settings.store, StoreLocation::Postgres(_)) {
            service.share_leases(store.clone());
        }
        // The audit log keeps `audit_retention` and at most AUDIT_KEPT entries.
        service.spawn({
            let service = service.clone();
            let retention =
                i64::try_from(settings.limits.audit_retention.as_secs()).unwrap_or(i64::MAX);
            async move {
                let mut tick = tokio::time::interval(AUDIT_PRUNE_EVERY);
                loop {
                    tick.tick().await;
                    let before = service.now().saturating_sub(retention);
                    match service.store().prune_audit(before, AUDIT_KEPT).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(entries = n, "pruned the audit log"),
                        Err(e) => tracing::warn!("cannot prune the audit log: {e}"),
                    }
                }
            }
        });
        // Histogram samples into their buckets, also when nobody scrapes.
        service.spawn(async {
            let mut tick = tokio::time::interval(telemetry::UPKEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                telemetry::upkeep();
            }
        });
        // Key rotation on schedule, rotations asked on other coordinators, node expiry.
        service.set_key_settings(settings.keys.clone());
        service.spawn({
            let service = service.clone();
            let every = settings.keys.tick();
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    service.key_tick().await;
                }
            }
        });
        let follow_task = match &settings.store {
            StoreLocation::Postgres(url) => Some(tokio::spawn(crate::follow::follow_postgres(
                service.clone(),
                url.clone(),
                shutdown.subscribe(),
            ))),
            StoreLocation::Sqlite => None,
        };
        tracing::info!(
            %quic_addr,
            tcp = %tcp_addr.map_or("off".to_string(), |a| a.to_string()),
            %admin_addr,
            reflect = %reflect_addr.map_or("off".to_string(), |a| a.to_string()),
            relay = settings.relay,
            %advertise,
            store = %settings.store.redacted(),
            "coordinator running"
        );
        Ok(Coordinator {
            state_dir: dir.clone(),
            quic_addr,
            tcp_addr,
            admin_addr,
            reflect_addr,
            relay,
            reflect_counters,
            advertise,
            fingerprint: id.fingerprint,
            admin_token,
            service,
            store,
            shutdown,
            quic_task,
            tcp_task,
            admin_task,
            failover_task,
            endpoint_task,
            follow_task,
            reflect_task,
            sweep_task,
        })
    }

    /// The bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound address of the TLS/TCP listener for agents; `None` when off.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the reflexive address responder; `None` when off.
    pub fn reflect_addr(&self) -> Option<SocketAddr> {
        self.reflect_addr
    }

    /// The relay (its counters); `None` when off.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    /// The reflexive address responder's counters now (zero when off).
    pub fn reflect_stats(&self) -> ReflectStats {
        self.reflect_counters.stats()
    }

    /// The `host:port` put in join tokens.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Hex SHA-256 of the certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The admin token (and whether this start made it).
    pub fn admin_token(&self) -> &AdminToken {
        &self.admin_token
    }

    /// The service, for in-process callers and tests.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Stops accepting, closes every session (code `SHUTDOWN`), stops the admin API, ends
    /// claims still in progress and closes the database.
    pub async fn shutdown(self) {
        self.grant_stop_leases().await;
        let _ = self.shutdown.send(true);
        let _ = self.quic_task.await;
        if let Some(t) = self.tcp_task {
            let _ = t.await;
        }
        let _ = self.failover_task.await;
        let _ = self.endpoint_task.await;
        if let Some(t) = self.reflect_task {
            let _ = t.await;
        }
        if let Some(t) = self.follow_task {
            let _ = t.await;
        }
        if let Some(t) = self.sweep_task {
            let _ = t.await;
        }
        // The service's own tasks end first: claims still waiting for their destination end
        // with their sessions, and the topology page's feed with them, which ends its open
        // event streams (else the admin API would wait for them to time out).
        self.service.abort_tasks();
        if tokio::time::timeout(Duration::from_secs(5), self.admin_task)
            .await
            .is_err()
        {
            tracing::warn!("admin API did not stop in time");
        }
        self.service.resign().await;
        self.store.close().await;
        tracing::info!("coordinator stopped");
    }

    /// Alone (SQLite): keeps serving until every holder's next heartbeat was answered with the
    /// stop lease (at most a heartbeat interval and a bit), so that holders keep answering for
    /// their workload addresses while this coordinator restarts.
    async fn grant_stop_leases(&self) {
        let (Some(longest), Some(lease)) = (
            self.service.stop_record_length(),
            self.service.timing().stop_lease,
        ) else {
            return;
        };
        // Recorded before the first is granted: the next run waits out what was granted.
        if let Err(e) = stop_record::record(&self.state_dir, SystemTime::now(), longest) {
            tracing::warn!("stopping without giving holders a last lease: {e}");
            return;
        }
        let Some(most) = self.service.begin_stop() else {
            return;
        };
        let started = tokio::time::Instant::now();
        let waiting = self.service.without_stop_lease();
        while self.service.without_stop_lease() > 0 && started.elapsed() < most {
            tokio::time::sleep(STOP_POLL).await;
        }
        let missed = self.service.without_stop_lease();
        if waiting > missed {
            tokio::time::sleep(STOP_LINGER).await;
        }
        tracing::info!(
            holders = waiting,
            missed,
            lease_ms = lease.as_millis(),
            took_ms = started.elapsed().as_millis(),
            "stopping: holders were given a last lease to ride out a restart"
        );
    }
}

/// How often a stopping coordinator looks whether every holder has its stop lease.
const STOP_POLL: Duration = Duration::from_millis(5);

/// Binds the QUIC endpoint and, unless off, the TLS/TCP listener (with the address asked
/// for). By default the TCP listener takes the QUIC endpoint's bound address; when the listen
/// port is ephemeral (0) and that port number is taken in TCP, another ephemeral QUIC port is
/// tried, so that agents find both transports at one port in tests as in production.
async fn bind_agent_listeners(
    id: &identity::Identity,
    settings: &Settings,
) -> Result<
    (
        quinn::Endpoint,
        SocketAddr,
        Option<(TcpListener, SocketAddr)>,
    ),
    StartError,
> {
    let mut tries = 0;
    loop {
        let endpoint = server::endpoint(
            id,
            settings.listen,
            &settings.limits,
            settings.relay,
            may_serve_relay_sessions(settings),
        )?;
        let quic_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let Some(addr) = settings.tcp_listen.resolve(quic_addr) else {
            return Ok((endpoint, quic_addr, None));
        };
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok((endpoint, quic_addr, Some((listener, addr)))),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && settings.tcp_listen == TcpListen::AtListen
                    && settings.listen.port() == 0
                    && tries < EPHEMERAL_TRIES =>
            {
                tries += 1;
                endpoint.close(0u32.into(), b"");
            }
            Err(source) => return Err(StartError::Tcp { addr, source }),
        }
    }
}

/// Whether this coordinator may serve relay sessions on its own port, and so offers their ALPN
/// on its QUIC endpoint, as far as its settings tell before the endpoint is bound (the default
/// `advertise` comes from the bound socket): the decision is
/// [`crate::relay::serves_relay_sessions`]'s (the TLS/TCP listener, set up after it, offers
/// the ALPN on the decision itself), and a QUIC relay connection to a coordinator that offered
/// the ALPN but decided against is closed.
fn may_serve_relay_sessions(settings: &Settings) -> bool {
    settings.relay && settings.relays.is_empty() && !settings.coordinators.is_empty()
}
