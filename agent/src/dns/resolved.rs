//! Registering the agent as the resolver of its suffix with the host's resolver, where the
//! host runs systemd-resolved: `resolvectl dns IFACE ADDR` and `resolvectl domain IFACE
//! ~SUFFIX` (a routing-only domain: only names under the suffix go to the agent), undone with
//! `resolvectl revert IFACE` at exit. Where resolved does not run, one log line says so and
//! the README's fallbacks apply (a `server=/mesh/ADDR` line for dnsmasq, a stub zone for
//! unbound).
//!
//! The commands sit behind [`HostResolver`], with [`Resolvectl`] for the real host and a fake
//! in the tests. An agent in a network namespace other than PID 1's registers nothing: the
//! interface name would name another link there.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tracing::{info, warn};

/// How long one `resolvectl` call may take (it waits on D-Bus).
const RESOLVECTL_TIMEOUT: Duration = Duration::from_secs(5);

/// A boxed future, for the trait's methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The host's resolver, as far as the agent configures it.
pub trait HostResolver: Send + Sync {
    /// Whether a resolver the agent can configure runs (resolved answers `resolvectl status`).
    fn available(&self) -> BoxFuture<'_, bool>;
    /// Sends names under `~suffix` on `interface` to `server`.
    fn set<'a>(
        &'a self,
        interface: &'a str,
        server: SocketAddr,
        suffix: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Undoes [`HostResolver::set`] for `interface`.
    fn revert<'a>(&'a self, interface: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// systemd-resolved through `resolvectl`.
pub struct Resolvectl;

/// Runs `resolvectl args`, bounded in time; `Err` with its error output when it fails.
async fn resolvectl(args: &[&str]) -> Result<(), String> {
    resolvectl_output(args).await.map(drop)
}

/// Whether this process shares the network namespace of PID 1, where resolved runs: `None`
/// when that cannot be read (`/proc/1/ns/net` needs more than `CAP_NET_ADMIN`, as under the
/// packaged unit), and [`same_link`] decides then. An interface name means another link in
/// another namespace: an agent in a namespace of its own (a container, a test bed) must not
/// configure the host's links.
fn in_init_netns() -> Option<bool> {
    let own = std::fs::read_link("/proc/self/ns/net").ok()?;
    let init = std::fs::read_link("/proc/1/ns/net").ok()?;
    Some(own == init)
}

/// Runs `resolvectl args`, bounded in time, and returns what it printed; `Err` with its error
/// output when it fails.
async fn resolvectl_output(args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new("resolvectl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RESOLVECTL_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "`resolvectl {}` did not answer within {RESOLVECTL_TIMEOUT:?}",
            args.join(" ")
        )),
        Ok(Err(e)) => Err(format!("cannot run resolvectl: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "`resolvectl {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The link index `resolvectl status IFACE` names (`Link 7 (mesh0)`), which is the index in
/// resolved's network namespace.
fn link_index(status: &str) -> Option<u32> {
    let rest = status.split("Link ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Whether `interface` is the same link for resolved as for this process: its index in this
/// namespace (sysfs) is the one resolved reports for that name.
async fn same_link(interface: &str) -> bool {
    let ours = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let theirs = resolvectl_output(&["status", interface])
        .await
        .ok()
        .as_deref()
        .and_then(link_index);
    ours.is_some() && ours == theirs
}

impl HostResolver for Resolvectl {
    fn available(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { in_init_netns() != Some(false) && resolvectl(&["status"]).await.is_ok() })
    }

    fn set<'a>(
        &'a self,
        interface: &'a str,
        server: SocketAddr,
        suffix: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            // resolved takes ADDR for port 53 and ADDR:PORT (IPv6 in brackets) otherwise.
            let server = match server.port() {
                53 => server.ip().to_string(),
                _ => server.to_string(),
            };
            if in_init_netns().is_none() && !same_link(interface).await {
                return Err(format!(
                    "resolved does not see {interface} as this agent's link (another network \
                     namespace?): nothing registered"
                ));
            }
            // The routing-only domain first: a link with a server and no domain yet would be
            // a default route for every name, for a moment.
            resolvectl(&["domain", interface, &format!("~{suffix}")]).await?;
            resolvectl(&["dns", interface, &server]).await
        })
    }

    fn revert<'a>(&'a self, interface: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { resolvectl(&["revert", interface]).await })
    }
}

/// A registration made: [`Registration::revert`] undoes it.
pub struct Registration {
    interface: String,
}

impl Registration {
    /// Registers `server` for `suffix` on `interface` where `host` can be configured; `None`
    /// (after one log line saying why) where it cannot.
    pub async fn register(
        host: &dyn HostResolver,
        interface: &str,
        server: SocketAddr,
        suffix: &str,
    ) -> Option<Registration> {
        if !host.available().await {
            info!(
                suffix,
                %server,
                "systemd-resolved does not run here (or in this network namespace): the host's \
                 resolver is not told about .{suffix} names (point it at {server} for them; \
                 see the README's DNS section)"
            );
            return None;
        }
        match host.set(interface, server, suffix).await {
            Ok(()) => {
                info!(interface, %server, suffix, "systemd-resolved sends .{suffix} names here");
                Some(Registration {
                    interface: interface.to_string(),
                })
            }
            Err(e) => {
                warn!("registering with systemd-resolved: {e}");
                // Half done (the server but not the domain) is undone.
                let _ = host.revert(interface).await;
                None
            }
        }
    }

    /// Undoes the registration (the interface's DNS settings in resolved).
    pub async fn revert(self, host: &dyn HostResolver) {
        if let Err(e) = host.revert(&self.interface).await {
            warn!(
                "reverting systemd-resolved's settings of {}: {e}",
                self.interface
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_index_resolvectl_names() {
        let status = "Link 7 (mesh0)\n    Current Scopes: DNS\n";
        assert_eq!(link_index(status), Some(7));
        assert_eq!(link_index("Global\n  Protocols: +LLMNR"), None);
        assert_eq!(link_index("Link x (mesh0)"), None);
    }
    use std::sync::Mutex;

    /// A host resolver that records what it is told.
    struct Fake {
        available: bool,
        fail_set: bool,
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(available: bool, fail_set: bool) -> Self {
            Fake {
                available,
                fail_set,
                calls: Mutex::new(Vec::new()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl HostResolver for Fake {
        fn available(&self) -> BoxFuture<'_, bool> {
            Box::pin(async { self.available })
        }

        fn set<'a>(
            &'a self,
            interface: &'a str,
            server: SocketAddr,
            suffix: &'a str,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("set {interface} {server} ~{suffix}"));
                if self.fail_set {
                    Err("no".into())
                } else {
                    Ok(())
                }
            })
        }

        fn revert<'a>(&'a self, interface: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                self.calls
                    .lock()
                    .unwrap()
                    .push(format!("revert {interface}"));
                Ok(())
            })
        }
    }

    const SERVER: &str = "100.64.0.1:53";

    #[tokio::test]
    async fn registered_with_resolved_and_reverted_at_exit() {
        let host = Fake::new(true, false);
        let r = Registration::register(&host, "mesh0", SERVER.parse().unwrap(), "mesh")
            .await
            .expect("registered");
        assert_eq!(host.calls(), ["set mesh0 100.64.0.1:53 ~mesh"]);
        r.revert(&host).await;
        assert_eq!(
            host.calls(),
            ["set mesh0 100.64.0.1:53 ~mesh", "revert mesh0"]
        );
    }

    #[tokio::test]
    async fn without_resolved_nothing_is_touched() {
        let host = Fake::new(false, false);
        let r = Registration::register(&host, "mesh0", SERVER.parse().unwrap(), "mesh").await;
        assert!(r.is_none());
        assert!(host.calls().is_empty());
    }

    #[tokio::test]
    async fn a_failed_registration_is_undone() {
        let host = Fake::new(true, true);
        let r = Registration::register(&host, "mesh0", SERVER.parse().unwrap(), "mesh").await;
        assert!(r.is_none());
        assert_eq!(
            host.calls(),
            ["set mesh0 100.64.0.1:53 ~mesh", "revert mesh0"]
        );
    }
}
