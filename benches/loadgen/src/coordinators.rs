//! The coordinators a run measures when they run in this process: one on its embedded
//! SQLite database (the default), or several sharing one PostgreSQL database, given by URL
//! or a private cluster the run starts and removes.
//!
//! Several coordinators are started as a mesh is deployed (README, "Several coordinators on
//! PostgreSQL"): the first makes the mesh's identity (certificate, key, admin token) in its
//! state directory, the others get copies of those files before they start (the database
//! refuses a coordinator with another certificate), and every one is told the same list of
//! all their QUIC addresses. Their ports are reserved before the first starts, since the
//! list is fixed at start.
//!
//! What a run leaves outside the process (the private cluster's server and directory, the
//! coordinators' temporary state directory) is owned by a [`Cleanup`], which removes it when
//! dropped, so on every way out of `main` that returns or unwinds, and from a signal handler
//! through a [`CleanupHandle`].

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meshlink_coordinator::config::StoreLocation;
use meshlink_coordinator::identity::{ADMIN_TOKEN_FILE, CERT_FILE, KEY_FILE};
use meshlink_coordinator::server::Limits;
use meshlink_coordinator::{Coordinator, Settings};
use meshlink_tests::postgres::{PgCluster, Unavailable};

/// The files that make a mesh's identity, copied from the first coordinator's state
/// directory into the others' (`coordinator/src/identity.rs`).
pub const IDENTITY_FILES: [&str; 3] = [CERT_FILE, KEY_FILE, ADMIN_TOKEN_FILE];

/// Where the in-process coordinators keep their state: what `--store` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded SQLite database in the state directory (`sqlite`): one coordinator.
    Sqlite,
    /// A private PostgreSQL cluster started for the run and removed at its end (`postgres`).
    PrivatePostgres,
    /// The PostgreSQL database at this URL (`postgres://USER@HOST[:PORT]/DB`).
    Postgres(String),
}

impl StoreChoice {
    /// Parses `sqlite`, `postgres` or a PostgreSQL URL.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(text: &str) -> Result<StoreChoice, String> {
        match text.trim() {
            "sqlite" => Ok(StoreChoice::Sqlite),
            "postgres" | "postgresql" => Ok(StoreChoice::PrivatePostgres),
            url => match StoreLocation::parse(url) {
                Ok(StoreLocation::Postgres(url)) => Ok(StoreChoice::Postgres(url)),
                Ok(StoreLocation::Sqlite) => Ok(StoreChoice::Sqlite),
                Err(e) => Err(format!(
                    "{e}; or `postgres` for a private cluster started for the run"
                )),
            },
        }
    }

    /// The store for `count` coordinators: `choice`, or by default SQLite for one and a
    /// private PostgreSQL cluster for several.
    ///
    /// # Errors
    /// SQLite asked for several coordinators.
    pub fn for_count(choice: Option<StoreChoice>, count: usize) -> Result<StoreChoice, String> {
        match choice {
            None if count > 1 => Ok(StoreChoice::PrivatePostgres),
            None => Ok(StoreChoice::Sqlite),
            Some(StoreChoice::Sqlite) if count > 1 => Err(format!(
                "{count} coordinators cannot share SQLite: --store postgres (a private \
                 cluster) or --store postgres://USER@HOST/DB"
            )),
            Some(choice) => Ok(choice),
        }
    }
}

/// What a run has outside this process until its end.
#[derive(Debug, Default)]
struct Leftovers {
    cluster: Option<PgCluster>,
    dir: Option<PathBuf>,
}

impl Leftovers {
    /// Stops and removes the cluster, then removes the directory. Idempotent.
    fn clean(&mut self) {
        // `PgCluster`'s drop stops the server and removes its directory.
        drop(self.cluster.take());
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Owns what a run leaves outside this process (see the module documentation); removes it
/// when dropped. Drop it after the coordinators have stopped, so that none of them sees its
/// database vanish.
#[derive(Debug, Default)]
pub struct Cleanup {
    leftovers: Arc<Mutex<Leftovers>>,
}

/// Removes a [`Cleanup`]'s leftovers from elsewhere (a signal handler).
#[derive(Debug, Clone)]
pub struct CleanupHandle {
    leftovers: Arc<Mutex<Leftovers>>,
}

impl CleanupHandle {
    /// Stops the private cluster and removes the directories now. Blocks while `pg_ctl`
    /// runs; idempotent.
    pub fn clean(&self) {
        self.leftovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clean();
    }
}

impl Cleanup {
    /// A handle that can clean up from another thread.
    pub fn handle(&self) -> CleanupHandle {
        CleanupHandle {
            leftovers: self.leftovers.clone(),
        }
    }

    /// Removes `dir` (recursively) at the end.
    pub fn remove_dir_at_end(&self, dir: PathBuf) {
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).dir = Some(dir);
    }

    /// Starts a private PostgreSQL cluster (`meshlink_tests::postgres::PgCluster`: a
    /// temporary directory, a Unix socket only, `fsync = off`), makes a database in it and
    /// keeps the cluster until the end. The cluster is removed on every failure too.
    ///
    /// # Errors
    /// [`Unavailable`]: PostgreSQL's server binaries are missing, or a step failed.
    pub fn start_private_postgres(&self) -> Result<PrivatePostgres, Unavailable> {
        let cluster = PgCluster::start()?;
        let url = cluster.create_database("loadgen")?;
        let data = cluster.socket_dir().join("data");
        let store = PrivatePostgres {
            url,
            postmaster: postmaster_pid(&data),
            version: std::fs::read_to_string(data.join("PG_VERSION"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default(),
        };
        self.leftovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cluster = Some(cluster);
        Ok(store)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.handle().clean();
    }
}

/// A private PostgreSQL cluster of this run ([`Cleanup::start_private_postgres`]).
#[derive(Debug, Clone)]
pub struct PrivatePostgres {
    /// The database's URL (`postgres://postgres@localhost/loadgen_0?host=SOCKET_DIR`).
    pub url: String,
    /// The server's process id (from `postmaster.pid`), for its CPU time; `None` when it
    /// cannot be read.
    pub postmaster: Option<u32>,
    /// PostgreSQL's major version (`PG_VERSION`), empty when unknown.
    pub version: String,
}

/// The first line of `DATA/postmaster.pid`.
fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// How to start the in-process coordinators.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How many (at least one).
    pub count: usize,
    /// Their store: SQLite for one only, else one PostgreSQL database for all.
    pub store: StoreLocation,
    /// The state directory of a lone coordinator, or the parent of several
    /// ([`state_dir`]).
    pub state_dir: PathBuf,
    /// Every coordinator's limits.
    pub limits: Limits,
}

/// Why the in-process coordinators could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No UDP port could be reserved on loopback.
    #[error("cannot reserve a UDP port on 127.0.0.1")]
    Port(#[source] std::io::Error),
    /// The first coordinator's identity could not be copied for another.
    #[error("cannot share the identity with {}: {step}", dir.display())]
    Identity {
        /// What failed: making the directory or copying a file.
        step: String,
        /// The other coordinator's state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A coordinator did not start.
    #[error("coordinator {index} did not start")]
    Coordinator {
        /// Which one (0-based).
        index: usize,
        /// Why.
        #[source]
        source: meshlink_coordinator::StartError,
    },
}

/// The state directory of coordinator `index` of `count` under `base`: `base` itself for a
/// lone coordinator, `base/coordinator-INDEX` for several.
pub fn state_dir(base: &Path, index: usize, count: usize) -> PathBuf {
    if count <= 1 {
        base.to_path_buf()
    } else {
        base.join(format!("coordinator-{index}"))
    }
}

/// Starts `plan.count` coordinators on this runtime, QUIC and admin API on 127.0.0.1, in
/// order: the first makes the identity, the others get a copy of it. With several, each
/// advertises its own QUIC address and all are told the list of all of them.
///
/// # Errors
/// [`StartError`]; the coordinators already started are shut down first.
pub async fn start(plan: &Plan) -> Result<Vec<Coordinator>, StartError> {
    let count = plan.count.max(1);
    // With several, the list of addresses is given to each at start, so the ports are
    // reserved first; each socket is closed just before its coordinator binds the port.
    let mut reserved = Vec::new();
    if count > 1 {
        for _ in 0..count {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(StartError::Port)?;
            let addr = socket.local_addr().map_err(StartError::Port)?;
            reserved.push(Some((socket, addr)));
        }
    }
    let list: Vec<String> = reserved
        .iter()
        .flatten()
        .map(|(_, addr)| addr.to_string())
        .collect();
    let mut started: Vec<Coordinator> = Vec::with_capacity(count);
    for index in 0..count {
        match start_one(plan, index, &mut reserved, &list).await {
            Ok(c) => started.push(c),
            Err(e) => {
                for c in started {
                    c.shutdown().await;
                }
                return Err(e);
            }
        }
    }
    Ok(started)
}

async fn start_one(
    plan: &Plan,
    index: usize,
    reserved: &mut [Option<(UdpSocket, SocketAddr)>],
    list: &[String],
) -> Result<Coordinator, StartError> {
    let count = plan.count.max(1);
    let dir = state_dir(&plan.state_dir, index, count);
    if index > 0 {
        copy_identity(&state_dir(&plan.state_dir, 0, count), &dir)?;
    }
    let mut settings = Settings::with_state_dir(dir);
    settings.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    settings.admin_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    settings.store = plan.store.clone();
    settings.limits = plan.limits.clone();
    if let Some((socket, addr)) = reserved.get_mut(index).and_then(Option::take) {
        drop(socket);
        settings.listen = addr;
        settings.advertise = Some(addr.to_string());
        settings.coordinators = list.to_vec();
    }
    Coordinator::start(&settings)
        .await
        .map_err(|source| StartError::Coordinator { index, source })
}

/// Copies the identity files from `from` into `to` (made 0700 if missing); the copies keep
/// the files' 0600 mode.
fn copy_identity(from: &Path, to: &Path) -> Result<(), StartError> {
    let err = |step: String| {
        let dir = to.to_path_buf();
        move |source| StartError::Identity { step, dir, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .map_err(err("making the directory".into()))?;
    for file in IDENTITY_FILES {
        let from = from.join(file);
        std::fs::copy(&from, to.join(file)).map_err(err(format!("copying {}", from.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices() {
        assert_eq!(StoreChoice::parse("sqlite"), Ok(StoreChoice::Sqlite));
        assert_eq!(
            StoreChoice::parse("postgres"),
            Ok(StoreChoice::PrivatePostgres)
        );
        assert_eq!(
            StoreChoice::parse("postgres://u@db/mesh"),
            Ok(StoreChoice::Postgres("postgres://u@db/mesh".into()))
        );
        assert!(StoreChoice::parse("mysql://db/x").is_err());
        assert_eq!(StoreChoice::for_count(None, 1), Ok(StoreChoice::Sqlite));
        assert_eq!(
            StoreChoice::for_count(None, 3),
            Ok(StoreChoice::PrivatePostgres)
        );
        assert!(StoreChoice::for_count(Some(StoreChoice::Sqlite), 2).is_err());
        assert_eq!(
            StoreChoice::for_count(Some(StoreChoice::PrivatePostgres), 1),
            Ok(StoreChoice::PrivatePostgres)
        );
    }

    #[test]
    fn state_dirs() {
        let base = Path::new("/tmp/x");
        assert_eq!(state_dir(base, 0, 1), base);
        assert_eq!(state_dir(base, 2, 3), base.join("coordinator-2"));
    }
}
