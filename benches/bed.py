"""The namespace test bed the Python benchmarks share: simulated providers joined by a router,
hosts on them, and processes started inside, all removed on cleanup.

Topology: a router namespace with one bridge per provider, provider k on 198.18.k.0/24 with
the router at .1 (IPv4 forwarding on); every host has one veth to its provider's bridge and
routes 198.18.0.0/15 through that router, with no default route. No packet leaves the
namespaces. Only python3's standard library is used.

`Harness` is the part without a topology (namespaces, processes, UAPI sockets and the temp
directory of a run, and their cleanup); `Bed` adds the providers. netbench.py builds its own
two-namespace topology on `Harness`.
"""

import json
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UAPI_DIR = "/var/run/wireguard"
UNDERLAY = "198.18.0.0/15"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args, check=True, capture=True, **kw):
    """Runs a command to completion and returns its stdout as text (None when not captured)."""
    if capture:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    else:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        err = proc.stderr.strip() if capture else ""
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {err}")
    return proc.stdout


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def pings(ns, dst):
    """True when one ping from namespace `ns` to `dst` is answered within a second."""
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", dst], capture_output=True).returncode == 0


def remove_uapi_socket(iface):
    """Removes the UAPI socket of `iface` if a daemon left it behind; returns its path if it did."""
    sock = os.path.join(UAPI_DIR, f"{iface}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
        return sock
    return None


def release_dir():
    """Cargo's release directory: $CARGO_TARGET_DIR/release, by default <repo>/target/release."""
    return os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release")


def cargo_build(*packages):
    """`cargo build --release -p ...` in the repository, echoing the command to stderr."""
    cmd = ["cargo", "build", "--release"] + [arg for p in packages for arg in ("-p", p)]
    log("building: " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)


def root_and_tun():
    """True when running as root with /dev/net/tun; otherwise says the run is skipped."""
    if os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
        return True
    print("skipped: needs root and /dev/net/tun", file=sys.stderr)
    return False


def interrupt_on(*sigs):
    """Turns each of `sigs` into a KeyboardInterrupt, so a `finally` cleans up."""
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in sigs:
        signal.signal(sig, on_signal)


def publish(report, env, opts, results):
    """Prints the report and the environment line to stdout; with `--json FILE`, writes every sample."""
    print(report)
    print()
    print("Environment: " + "; ".join(f"{k} {v}" for k, v in env.items() if v))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "environment": env, "results": results}, f, indent=2)


class Harness:
    """Owns the namespaces, processes and files a run creates; `cleanup` removes them all.

    Processes start inside a namespace under `setpriv --pdeathsig TERM`, with their output in a
    log file in the run's temp directory. `interfaces` lists tunnel interface names whose UAPI
    sockets `cleanup` removes should their daemons leave them behind; `opts.keep_logs` keeps
    the temp directory.
    """

    poll_interval = 0.05  # seconds between two probes in `wait_for`

    def __init__(self, opts, prefix):
        self.opts = opts
        self.prefix = prefix
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}-")
        self.procs = []  # every Popen still running, ended in cleanup
        self.lock = threading.Lock()
        self.namespaces = []
        self.interfaces = []  # tunnel interface names, for leftover UAPI sockets

    def add_namespace(self, ns):
        """Creates namespace `ns` (removed in cleanup) with its loopback up."""
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def track(self, proc):
        with self.lock:
            self.procs.append(proc)
        return proc

    def untrack(self, proc):
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    @staticmethod
    def exec_args(ns, args):
        # `ip netns exec` and `setpriv` replace themselves with the program, so proc.pid is the
        # program's own pid (for signals and /proc/PID/stat); --pdeathsig ends it should this
        # script die without cleanup (e.g. SIGKILL).
        return ["ip", "netns", "exec", ns, "setpriv", "--pdeathsig", "TERM", "--", *args]

    def spawn_in(self, ns, args, log_name, env=None):
        """Starts `args` in namespace `ns`, output to a log file in the run's directory; `env`
        adds to this script's environment."""
        path = os.path.join(self.tmp, log_name)
        with open(path, "wb") as logf:
            proc = subprocess.Popen(self.exec_args(ns, args), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=dict(os.environ, **env) if env else None)
        proc.log_path = path
        return self.track(proc)

    def spawn_piped_in(self, ns, args, log_name):
        """Starts `args` in namespace `ns` with text pipes on stdin and stdout; stderr to a log."""
        path = os.path.join(self.tmp, log_name)
        with open(path, "wb") as logf:
            proc = subprocess.Popen(self.exec_args(ns, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=logf, text=True, bufsize=1)
        proc.log_path = path
        return self.track(proc)

    def stop(self, proc, grace=5.0):
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.untrack(proc)

    def wait_for(self, what, timeout, probe, proc=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited ({proc.returncode}):\n{tail(proc.log_path)}")
            if probe():
                return
            time.sleep(self.poll_interval)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}"
                           + (f":\n{tail(proc.log_path)}" if proc is not None else ""))

    def cleanup(self):
        for proc in list(self.procs):
            try:
                self.stop(proc, grace=3)
            except Exception as e:  # keep cleaning up whatever happens
                log(f"warning: could not stop pid {proc.pid}: {e}")
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        for iface in self.interfaces:
            remove_uapi_socket(iface)
        if self.opts.keep_logs:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def environment(unknown_cpu=None):
        """Kernel, CPU count and CPU model; `unknown_cpu` stands for a model /proc/cpuinfo lacks."""
        env = {"kernel": os.uname().release, "cpus": os.cpu_count()}
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
                if m:
                    env["cpu"] = m.group(1).strip()
                elif unknown_cpu is not None:
                    env["cpu"] = unknown_cpu
        except OSError:
            pass
        return env


def token_file(directory, name, token):
    """Writes a join token to a 0600 file (agents read it with --token-file: a token on the
    command line is visible to every local user) and returns its path."""
    path = os.path.join(directory, f"{name}.token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


class PgCluster:
    """A private PostgreSQL cluster: `initdb` into a temporary directory as the `postgres` user
    (initdb refuses root), a server listening only on a Unix socket in that directory (reachable
    from every network namespace), stopped and removed by `close`. The same procedure as
    tests/src/postgres.rs."""

    def __init__(self):
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                          key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
        if not versions:
            raise RuntimeError("PostgreSQL's server is missing (apt-get install postgresql)")
        self.bin = os.path.dirname(versions[-1])
        self.dir = tempfile.mkdtemp(prefix="mlpg-")
        pw = pwd.getpwnam("postgres")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.pg("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.dir}'\nmax_connections = 200\n")
        self.start()

    def pg(self, program, *args):
        return run(["runuser", "-u", "postgres", "--", os.path.join(self.bin, program), *args], cwd="/")

    def start(self):
        self.pg("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"), "-w", "-t", "30", "start")

    def stop(self):
        self.pg("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def create_database(self, name):
        self.pg("createdb", "-h", self.dir, "-U", "postgres", name)
        return f"postgres://postgres@localhost/{name}?host={self.dir}"

    def close(self):
        subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(self.bin, "pg_ctl"), "-D", self.data,
                        "-m", "immediate", "-w", "stop"], capture_output=True, cwd="/")
        shutil.rmtree(self.dir, ignore_errors=True)


class Bed(Harness):
    """Owns every namespace, process and file a run creates; `cleanup` removes them all.

    `hosts` is a list of `(name, provider number, last octet)`.
    """

    def __init__(self, opts, prefix, providers, hosts):
        super().__init__(opts, prefix)
        self.providers = providers
        self.hosts = hosts
        self.bin = lambda name: os.path.join(opts.bin_dir, name)

    def ns_name(self, host):
        return f"{self.prefix}-{host}"

    def ip(self, host, *args):
        return run(["ip", "-n", self.ns_name(host), *args])

    def spawn(self, host, args, log_name):
        """Starts `args` in `host`, output to a log file in the run's directory."""
        return self.spawn_in(self.ns_name(host), args, log_name)

    def spawn_piped(self, host, args, log_name):
        """Starts `args` in `host` with text pipes on stdin and stdout; stderr to a log."""
        return self.spawn_piped_in(self.ns_name(host), args, log_name)

    def setup(self):
        for host in ["r"] + [h for h, _, _ in self.hosts]:
            self.add_namespace(self.ns_name(host))
        run(["ip", "netns", "exec", self.ns_name("r"), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        for prov in range(1, self.providers + 1):
            br = f"{self.prefix}br{prov}"
            self.ip("r", "link", "add", br, "type", "bridge")
            self.ip("r", "addr", "add", f"198.18.{prov}.1/24", "dev", br)
            self.ip("r", "link", "set", br, "up")
        for host, prov, octet in self.hosts:
            here, there = f"{self.prefix}{host}e", f"{self.prefix}{host}r"
            run(["ip", "link", "add", here, "netns", self.ns_name(host), "mtu", "1500", "type", "veth",
                 "peer", "name", there, "netns", self.ns_name("r"), "mtu", "1500"])
            self.ip("r", "link", "set", there, "master", f"{self.prefix}br{prov}", "up")
            self.ip(host, "addr", "add", f"198.18.{prov}.{octet}/24", "dev", here)
            self.ip(host, "link", "set", here, "up")
            self.ip(host, "route", "add", UNDERLAY, "via", f"198.18.{prov}.1")
