//! A private PostgreSQL cluster for one test run: `initdb` into a temporary directory, a
//! server listening only on a Unix socket in that directory, databases made on demand, and
//! everything stopped and removed when the cluster is dropped (or, for the cluster shared by
//! a test binary, once the process has ended, by a reaper process).
//!
//! The server binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/N/bin`,
//! highest N), or the directory named by `MESHLINK_PG_BIN`. `initdb` refuses to run as
//! root, so as root the cluster belongs to the `postgres` user the package creates, and its
//! commands run through `runuser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::skipping_allowed;

/// Why a cluster cannot be had.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running private cluster. See the module documentation.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    /// Holds `data/`, the socket and the log; removed on drop.
    dir: PathBuf,
    /// Run the server's commands as this user (`Some("postgres")` when we are root).
    run_as: Option<&'static str>,
    databases: AtomicU32,
}

fn find_bin() -> Result<PathBuf, Unavailable> {
    if let Ok(dir) = std::env::var("MESHLINK_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or_else(|| {
        Unavailable(
            "PostgreSQL's server binaries are missing (/usr/lib/postgresql/N/bin/initdb): \
             apt-get install postgresql, or set MESHLINK_PG_BIN"
                .into(),
        )
    })
}

impl PgCluster {
    /// Makes and starts a new cluster.
    ///
    /// # Errors
    /// [`Unavailable`] when the binaries are missing or a step fails (its output included).
    pub fn start() -> Result<PgCluster, Unavailable> {
        let bin = find_bin()?;
        let root = nix::unistd::geteuid().is_root();
        let run_as = root.then_some("postgres");
        let dir = std::env::temp_dir().join(format!(
            "meshlink-pg-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| Unavailable(format!("{}: {e}", dir.display())))?;
        let cluster = PgCluster {
            bin,
            dir,
            run_as,
            databases: AtomicU32::new(0),
        };
        if root {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Unavailable("no `postgres` user (apt-get install postgresql)".into())
                })?;
            nix::unistd::chown(&cluster.dir, Some(user.uid), Some(user.gid))
                .map_err(|e| Unavailable(format!("chown {}: {e}", cluster.dir.display())))?;
        }
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        // Only a Unix socket in our own directory: no TCP port to collide with or expose.
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\n\
             max_connections = 200\n",
            cluster.dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)
            .map_err(|e| Unavailable(format!("{}: {e}", conf_path.display())))?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)
            .map_err(|e| Unavailable(format!("{}: {e}", conf_path.display())))?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The cluster shared by every test of this process, started on first use and stopped at
    /// exit. `None` (after printing why) when PostgreSQL is missing and skipping is allowed.
    ///
    /// # Panics
    /// When PostgreSQL is missing and skipping is not allowed (`CI=true`), or it fails.
    pub fn shared() -> Option<&'static PgCluster> {
        static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        let r = SHARED.get_or_init(|| match PgCluster::start() {
            Ok(c) => match c.reap_after_exit() {
                Ok(()) => Ok(c),
                Err(e) => Err(e.0),
            },
            Err(e) => Err(e.0),
        });
        match r {
            Ok(c) => Some(c),
            Err(e) => {
                assert!(
                    skipping_allowed(|k| std::env::var(k).ok()),
                    "this test needs PostgreSQL, and CI=true forbids skipping it: {e}"
                );
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("skipped: needs PostgreSQL: {e}\n").as_bytes(),
                );
                None
            }
        }
    }

    /// A shared cluster is never dropped (statics are not): a small shell process waits for
    /// this process to end, however it ends, then stops the server and removes the directory.
    fn reap_after_exit(&self) -> Result<(), Unavailable> {
        let data = path_str(&self.data_dir())?.to_string();
        let pg_ctl = self.bin.join("pg_ctl");
        let pg_ctl = path_str(&pg_ctl)?.to_string();
        let as_user = self
            .run_as
            .map_or(String::new(), |u| format!("runuser -u {u} -- "));
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             {as_user}\"$1\" -D \"$2\" -m immediate -w stop >/dev/null 2>&1; rm -rf \"$3\"",
            pid = std::process::id(),
        );
        Command::new("sh")
            .args(["-c", &script, "meshlink-pg-reaper", &pg_ctl, &data])
            .arg(&self.dir)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Unavailable(format!("sh: {e}")))?;
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), Unavailable> {
        run_as(self.run_as, &self.bin.join(program), args)
    }

    fn start_server(&self) -> Result<(), Unavailable> {
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
    }

    /// Stops the server (fast shutdown: sessions are ended), keeping its data.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn stop(&self) -> Result<(), Unavailable> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir())?,
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
    }

    /// Starts the server again after [`PgCluster::stop`].
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn restart(&self) -> Result<(), Unavailable> {
        self.start_server()
    }

    /// Makes a new, empty database and returns its URL
    /// (`postgres://postgres@localhost/NAME?host=SOCKET_DIR`).
    ///
    /// # Errors
    /// When `createdb` fails.
    pub fn create_database(&self, prefix: &str) -> Result<String, Unavailable> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{n}");
        self.run(
            "createdb",
            &["-h", path_str(&self.dir)?, "-U", "postgres", &name],
        )?;
        Ok(self.url(&name))
    }

    /// The URL of database `name` of this cluster.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}",
            self.dir.display()
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop_and_remove(&self.bin, &self.dir, self.run_as);
    }
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

fn stop_and_remove(bin: &Path, dir: &Path, user: Option<&'static str>) {
    let data = dir.join("data");
    if let Some(data) = data.to_str() {
        let _ = run_as(
            user,
            &bin.join("pg_ctl"),
            &["-D", data, "-m", "immediate", "-w", "stop"],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn run_as(user: Option<&str>, program: &Path, args: &[&str]) -> Result<(), Unavailable> {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    // A directory the server's user may enter, whatever the caller's is.
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .map_err(|e| Unavailable(format!("{}: {e}", program.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Unavailable(format!(
            "{} {} failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn path_str(p: &Path) -> Result<&str, Unavailable> {
    p.to_str()
        .ok_or_else(|| Unavailable(format!("{}: not UTF-8", p.display())))
}
