"""The namespace test bed the Python benchmarks share: simulated providers joined by a router,
hosts on them, and processes started inside, all removed on cleanup.

Topology: a router namespace with one bridge per provider, provider k on 198.18.k.0/24 with
the router at .1 (IPv4 forwarding on); every host has one veth to its provider's bridge and
routes 198.18.0.0/15 through that router, with no default route. No packet leaves the
namespaces. Only python3's standard library is used.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

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


class Bed:
    """Owns every namespace, process and file a run creates; `cleanup` removes them all.

    `hosts` is a list of `(name, provider number, last octet)`.
    """

    def __init__(self, opts, prefix, providers, hosts):
        self.opts = opts
        self.prefix = prefix
        self.providers = providers
        self.hosts = hosts
        self.tmp = tempfile.mkdtemp(prefix=f"{prefix}-")
        self.procs = []  # every Popen still running, ended in cleanup
        self.lock = threading.Lock()
        self.namespaces = []
        self.interfaces = []  # agent interface names, for leftover UAPI sockets
        self.bin = lambda name: os.path.join(opts.bin_dir, name)

    def ns_name(self, host):
        return f"{self.prefix}-{host}"

    def ip(self, host, *args):
        return run(["ip", "-n", self.ns_name(host), *args])

    def track(self, proc):
        with self.lock:
            self.procs.append(proc)
        return proc

    def untrack(self, proc):
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def _exec(self, host, args):
        # `ip netns exec` and `setpriv` replace themselves with the program, so proc.pid is the
        # program's own pid; --pdeathsig ends it should this script die without cleanup.
        return ["ip", "netns", "exec", self.ns_name(host), "setpriv", "--pdeathsig", "TERM", "--", *args]

    def spawn(self, host, args, log_name):
        """Starts `args` in `host`, output to a log file in the run's directory."""
        path = os.path.join(self.tmp, log_name)
        with open(path, "wb") as logf:
            proc = subprocess.Popen(self._exec(host, args), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT)
        proc.log_path = path
        return self.track(proc)

    def spawn_piped(self, host, args, log_name):
        """Starts `args` in `host` with text pipes on stdin and stdout; stderr to a log."""
        path = os.path.join(self.tmp, log_name)
        with open(path, "wb") as logf:
            proc = subprocess.Popen(self._exec(host, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}"
                           + (f":\n{tail(proc.log_path)}" if proc is not None else ""))

    def setup(self):
        for host in ["r"] + [h for h, _, _ in self.hosts]:
            ns = self.ns_name(host)
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            self.ip(host, "link", "set", "lo", "up")
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
            sock = os.path.join(UAPI_DIR, f"{iface}.sock")
            if os.path.exists(sock):
                os.unlink(sock)
        if self.opts.keep_logs:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def environment():
        env = {"kernel": os.uname().release, "cpus": os.cpu_count()}
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
                if m:
                    env["cpu"] = m.group(1).strip()
        except OSError:
            pass
        return env
