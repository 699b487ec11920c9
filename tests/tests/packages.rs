//! The Debian packages: `scripts/package` builds meshlink-agent, meshlink-coordinator and
//! meshctl from the binaries this test run already has, the packages are unpacked into a
//! private root per simulated host (`dpkg -x`: nothing is installed on the machine running the
//! test), and their systemd units are started as systemd would start them, systemd being
//! absent here: `ExecStart=` with the unit's `Environment=` and `EnvironmentFile=`, its
//! `StateDirectory=`, its user (`DynamicUser=` as an unused uid without a passwd entry, as
//! systemd allocates them), its capability bounding and ambient sets, `NoNewPrivileges=` and
//! `UMask=`. Paths under `/etc`, `/usr` and `/var/lib` are taken inside the root; the socket
//! directory `/var/run/wireguard` is the machine's, as in the other tests (unique interface
//! names). Not emulated: the filesystem and system-call sandboxing (`ProtectSystem=`,
//! `SystemCallFilter=`, ...), which `systemd-analyze verify` checks for syntax only.
//!
//! The coordinator's unit runs in host `a`; the agent's unit runs in `a` and in `b`, each
//! joining with a token made by the packaged meshctl; the two agents then ping each other
//! over the overlay. Needs root, `dpkg-deb`, `objdump`, `setpriv` and `systemd-analyze`;
//! under CI a missing tool fails the test.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshlink_tests::process::{Stdout, SCHED_RR};
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, require_tool, target_profile_dir,
    unique_name, wait_until, NsRef, Process, TwoHosts,
};

/// Where the packages put their units.
const UNIT_DIR: &str = "usr/lib/systemd/system";
/// The coordinator's admin API, from its packaged `/etc/meshlink/coordinator.toml`.
const ADMIN_URL: &str = "http://127.0.0.1:7444";
/// The coordinator's QUIC port, from the same file.
const QUIC_PORT: u16 = 7443;
/// Bound on a unit's service becoming usable.
const READY: Duration = Duration::from_secs(30);
/// Bound on the first overlay ping (joins, maps, handshakes).
const FIRST_PING: Duration = Duration::from_secs(30);

/// The `[Service]` section of a unit file: each key with its values in order (a key such as
/// `Environment=` may repeat).
#[derive(Debug)]
struct Unit {
    name: String,
    service: BTreeMap<String, Vec<String>>,
}

impl Unit {
    /// Reads `ROOT/usr/lib/systemd/system/NAME`.
    fn read(root: &Path, name: &str) -> Unit {
        let path = root.join(UNIT_DIR).join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is not installed: {e}", path.display()));
        let mut service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{name}: continued lines are not read here"
            );
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else if section == "Service" {
                let (key, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: not KEY=VALUE: {line}"));
                service
                    .entry(key.trim().to_string())
                    .or_default()
                    .push(value.trim().to_string());
            }
        }
        Unit {
            name: name.to_string(),
            service,
        }
    }

    /// The last value of `key` (systemd's rule for single-valued keys).
    fn one(&self, key: &str) -> Option<&str> {
        self.service
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn all(&self, key: &str) -> &[String] {
        self.service.get(key).map_or(&[], Vec::as_slice)
    }

    fn yes(&self, key: &str) -> bool {
        matches!(self.one(key), Some("yes" | "true" | "1" | "on"))
    }

    /// The capability names of `key` (`CAP_NET_ADMIN` -> `net_admin`), for setpriv.
    fn caps(&self, key: &str) -> Option<Vec<String>> {
        self.one(key).map(|v| {
            v.split_whitespace()
                .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
                .collect()
        })
    }
}

/// `path` as seen in the unpacked root: paths under `/etc/`, `/usr/` and `/var/lib/` are
/// the package's (or its state's) and move into `root`; others (`/var/run/wireguard`,
/// `/dev/net/tun`) are the machine's.
fn in_root(root: &Path, word: &str) -> String {
    let moved = ["/etc/", "/usr/", "/var/lib/"];
    if moved.iter().any(|p| word.starts_with(p)) {
        format!("{}{word}", root.display())
    } else {
        word.to_string()
    }
}

/// `KEY=VALUE` lines of an environment file (comments and blank lines skipped).
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// A uid that no user of this machine has, in systemd's range for dynamic users
/// (61184-65519).
fn dynamic_uid() -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (61184 + std::process::id() % 4000..65519)
        .find(|u| !taken.contains(u))
        .expect("a free uid in the dynamic range")
}

/// Starts `unit` from the unpacked `root` in `ns` as systemd would (see the module's
/// documentation); the log goes to `log`.
fn start_unit(ns: &NsRef, root: &Path, unit: &Unit, log: &Path) -> (Process, u32) {
    let exec = unit
        .one("ExecStart")
        .unwrap_or_else(|| panic!("{}: no ExecStart", unit.name));
    let argv: Vec<String> = exec.split_whitespace().map(|w| in_root(root, w)).collect();

    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    for file in unit.all("EnvironmentFile") {
        let (optional, file) = match file.strip_prefix('-') {
            Some(f) => (true, f),
            None => (false, file.as_str()),
        };
        match std::fs::read_to_string(in_root(root, file)) {
            Ok(text) => env.extend(environment_file(&text)),
            Err(e) => assert!(optional, "{}: EnvironmentFile {file}: {e}", unit.name),
        }
    }
    for assignment in unit.all("Environment") {
        let (k, v) = assignment
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: Environment={assignment}", unit.name));
        env.push((k.to_string(), in_root(root, v)));
    }

    let uid = if unit.yes("DynamicUser") {
        dynamic_uid()
    } else {
        match unit.one("User") {
            None | Some("root") => 0,
            Some(other) => panic!("{}: User={other} is not emulated here", unit.name),
        }
    };
    for dir in unit.all("StateDirectory") {
        let path = PathBuf::from(in_root(root, &format!("/var/lib/{dir}")));
        std::fs::create_dir_all(&path).expect("state directory");
        let mode = unit
            .one("StateDirectoryMode")
            .map_or(0o755, |m| u32::from_str_radix(m, 8).expect("octal mode"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        nix::unistd::chown(&path, Some(uid.into()), Some(uid.into())).unwrap();
    }
    for dir in unit.all("RuntimeDirectory") {
        std::fs::create_dir_all(Path::new("/run").join(dir)).expect("runtime directory");
    }

    let mut cmd = ns.daemon_command("setpriv");
    if uid != 0 {
        cmd.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()])
            .arg("--clear-groups");
    }
    if let Some(caps) = unit.caps("CapabilityBoundingSet") {
        let mut set = vec!["-all".to_string()];
        set.extend(caps.iter().map(|c| format!("+{c}")));
        cmd.arg(format!("--bounding-set={}", set.join(",")));
    }
    if let Some(caps) = unit.caps("AmbientCapabilities").filter(|c| !c.is_empty()) {
        let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        cmd.arg(format!("--inh-caps={}", plus.join(",")))
            .arg(format!("--ambient-caps={}", plus.join(",")));
    }
    if unit.yes("NoNewPrivileges") {
        cmd.arg("--no-new-privs");
    }
    let umask = unit.one("UMask").unwrap_or("0022");
    cmd.args([
        "--",
        "sh",
        "-c",
        &format!("umask {umask} && exec \"$0\" \"$@\""),
    ])
    .args(&argv)
    .env_clear()
    .envs(env);
    let process = Process::spawn(&unit.name, cmd, log, Stdout::Log);
    (process, uid)
}

/// Every line `systemd-analyze verify` prints about the unpacked `unit` must be about its
/// binary being absent from the machine's `/usr/bin` (it is in the root, not installed).
fn verify(root: &Path, unit: &str, binary: &str) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(root.join(UNIT_DIR).join(unit))
        .output()
        .expect("systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let absent = format!("Command /usr/bin/{binary} is not executable");
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains(&absent),
            "systemd-analyze verify {unit}: {line}\n{text}"
        );
    }
}

/// `meshctl --coordinator ADMIN_URL --admin-token-file FILE ARGS -o json` from the root.
fn meshctl(ns: &NsRef, root: &Path, token_file: &Path, args: &[&str]) -> serde_json::Value {
    let bin = root.join("usr/bin/meshctl");
    let mut full = vec![
        "--coordinator",
        ADMIN_URL,
        "--admin-token-file",
        token_file.to_str().expect("UTF-8 path"),
    ];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let out = ns.exec(bin.to_str().expect("UTF-8 path"), &full);
    assert!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("meshctl {args:?}: {e}"))
}

/// Writes the agent's `/etc/meshlink/agent.env` in `root`, as an operator would.
fn configure_agent(root: &Path, token: &str, name: &str, iface: &str) {
    let path = root.join("etc/meshlink/agent.env");
    let mut text = std::fs::read_to_string(&path).expect("the packaged agent.env");
    text.push_str(&format!(
        "MESHLINK_TOKEN={token}\nMESHLINK_NAME={name}\nMESHLINK_INTERFACE={iface}\n"
    ));
    meshlink_tests::write_secret(&path, &text);
}

#[test]
fn packages_install_and_their_units_run_a_mesh() {
    if !require_root() {
        return;
    }
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("objdump", "binutils"),
        ("setpriv", "util-linux"),
        ("systemd-analyze", "systemd"),
    ] {
        require_tool(tool, package);
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let bed = TwoHosts::create("packages");
    assert!(
        bed.underlay_works(),
        "underlay ping between the namespaces failed"
    );

    // Build from the binaries of this run, quickly (no compression, no stripping).
    let debs = bed.dir.join("debs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package");
    let out = Command::new(&script)
        .arg("--bin-dir")
        .arg(target_profile_dir())
        .arg("--out")
        .arg(&debs)
        .arg("--fast")
        .output()
        .expect("scripts/package");
    assert!(
        out.status.success(),
        "scripts/package failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(built.len(), 3, "three packages: {built:?}");
    for (deb, package) in built
        .iter()
        .zip(["meshlink-agent", "meshlink-coordinator", "meshctl"])
    {
        let field = |f: &str| {
            let out = Command::new("dpkg-deb")
                .args(["-f"])
                .arg(deb)
                .arg(f)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(field("Package"), package);
        assert!(
            field("Depends").contains("libc6 (>= "),
            "{package}: Depends"
        );
        // The maintainer scripts parse, and every file under /etc is a conffile.
        let control = bed.dir.join(&format!("control-{package}"));
        let status = Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb)
            .arg(&control)
            .status()
            .unwrap();
        assert!(status.success(), "dpkg-deb -e {}", deb.display());
        for script in ["postinst", "prerm", "postrm"] {
            let path = control.join(script);
            if path.exists() {
                let ok = Command::new("sh").arg("-n").arg(&path).status().unwrap();
                assert!(ok.success(), "{package}: {script} does not parse");
            }
        }
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
        let listing = Command::new("dpkg-deb")
            .arg("-c")
            .arg(deb)
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let Some(path) = line.split_whitespace().last() else {
                continue;
            };
            if path.starts_with("./etc/") && !path.ends_with('/') {
                let path = &path[1..];
                assert!(
                    conffiles.lines().any(|c| c == path),
                    "{package}: {path} is not a conffile"
                );
            }
        }
    }

    // One root per host: `a` has the coordinator, meshctl and an agent; `b` an agent.
    let roots = [bed.dir.join("root-a"), bed.dir.join("root-b")];
    for (root, debs) in roots.iter().zip([&built[..], &built[..1]]) {
        for deb in debs {
            let status = Command::new("dpkg")
                .arg("-x")
                .arg(deb)
                .arg(root)
                .status()
                .unwrap();
            assert!(status.success(), "dpkg -x {}", deb.display());
        }
    }
    let (root_a, root_b) = (&roots[0], &roots[1]);
    for (unit, binary) in [
        ("meshlink-coordinator.service", "meshlink-coordinator"),
        ("meshlink-agent.service", "meshlink-agent"),
    ] {
        verify(root_a, unit, binary);
    }
    // The packaged env files hold secrets: 0600, as installed.
    let mode = std::fs::metadata(root_a.join("etc/meshlink/agent.env"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "agent.env mode");

    // The coordinator's unit: a dynamic user, advertising host `a`'s underlay address.
    std::fs::write(
        root_a.join("etc/meshlink/coordinator.env"),
        format!("MESHLINK_ADVERTISE={}:{QUIC_PORT}\n", bed.a.underlay),
    )
    .unwrap();
    let coordinator_unit = Unit::read(root_a, "meshlink-coordinator.service");
    let (mut coordinator, coordinator_uid) = start_unit(
        &bed.a.ns,
        root_a,
        &coordinator_unit,
        &bed.dir.join("coordinator.log"),
    );
    assert_ne!(coordinator_uid, 0, "the coordinator's unit runs it as root");
    let state = root_a.join("var/lib/meshlink-coordinator");
    let token_file = state.join("admin.token");
    wait_until(READY, "the coordinator's admin token and API", || {
        (token_file.exists()
            && bed
                .a
                .ns
                .exec(
                    root_a.join("usr/bin/meshctl").to_str().unwrap(),
                    &[
                        "--coordinator",
                        ADMIN_URL,
                        "--admin-token-file",
                        token_file.to_str().unwrap(),
                        "network",
                        "list",
                    ],
                )
                .status
                .success())
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", coordinator.log()));
    // Its state belongs to its own user, not root.
    let owner = std::fs::metadata(&token_file).unwrap().uid();
    assert_eq!(owner, coordinator_uid, "admin.token owner");

    meshctl(
        &bed.a.ns,
        root_a,
        &token_file,
        &["network", "create", "pk", "--cidr", "100.64.0.0/24"],
    );
    let agent_unit = Unit::read(root_a, "meshlink-agent.service");
    let mut agents = Vec::new();
    for (host, root, name) in [(&bed.a, root_a, "pa"), (&bed.b, root_b, "pb")] {
        let token = meshctl(
            &bed.a.ns,
            root_a,
            &token_file,
            &["token", "create", "--network", "pk"],
        );
        let token = token["token"].as_str().expect("a token").to_string();
        let iface = unique_name("p");
        configure_agent(root, &token, name, &iface);
        let unit = Unit::read(root, "meshlink-agent.service");
        assert_eq!(unit.service, agent_unit.service, "one agent unit");
        let log = bed.dir.join(&format!("agent-{name}.log"));
        let (agent, _) = start_unit(&host.ns, root, &unit, &log);
        agents.push((agent, host, root, name));
    }

    // Both join, get addresses, and reach each other through the tunnel.
    let addresses: Vec<Ipv4Addr> = wait_until(READY, "both agents online with addresses", || {
        let nodes = meshctl(&bed.a.ns, root_a, &token_file, &["node", "list"]);
        let list = nodes.as_array().cloned().unwrap_or_default();
        let address = |name: &str| {
            list.iter()
                .find(|n| n["name"] == name && n["online"] == true)
                .and_then(|n| n["address"].as_str()?.split('/').next()?.parse().ok())
        };
        Some(vec![address("pa")?, address("pb")?])
    })
    .unwrap_or_else(|e| {
        let logs: Vec<String> = agents.iter().map(|(p, ..)| p.log_tail(20)).collect();
        panic!(
            "{e}\ncoordinator:\n{}\nagents:\n{}",
            coordinator.log_tail(20),
            logs.join("\n--\n")
        )
    });
    bed.a.ns.wait_for_ping(addresses[1], FIRST_PING).unwrap();
    bed.b.ns.wait_for_ping(addresses[0], FIRST_PING).unwrap();
    // The unit's capabilities let the agent serve its names on port 53.
    for (agent, _, _, name) in &agents {
        wait_until(READY, &format!("agent {name} to serve DNS names"), || {
            agent.log_tail(400).contains("DNS server: ").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e} under its unit:\n{}", agent.log_tail(30)));
    }
    // The unit's capabilities let the agent's runtime threads take real-time priority.
    for (agent, _, _, name) in &agents {
        let threads = agent.thread_policies();
        assert!(
            threads
                .iter()
                .any(|(t, p)| t == "meshlink" && *p == SCHED_RR)
                && threads
                    .iter()
                    .all(|(t, p)| t != "meshlink" || *p == SCHED_RR),
            "agent {name}'s runtime threads under its unit: {threads:?}\n{}",
            agent.log_tail(30)
        );
    }
    for (_, _, root, name) in &agents {
        assert!(
            root.join("var/lib/meshlink/node.json").exists(),
            "agent {name} keeps its identity in the unit's StateDirectory"
        );
    }

    // `systemctl stop` sends SIGTERM: each service stops cleanly, status 0.
    for (mut agent, _, _, name) in agents {
        let status = agent.terminate();
        assert!(
            status.success(),
            "agent {name} stopped with {status}:\n{}",
            agent.log()
        );
    }
    let status = coordinator.terminate();
    assert!(
        status.success(),
        "coordinator stopped with {status}:\n{}",
        coordinator.log()
    );
}
