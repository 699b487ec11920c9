#!/usr/bin/env python3
"""Churn soak (issue 11 item 10): a real coordinator, a fleet of simulated agents churning for
minutes, three real agents in namespaces under traffic; afterwards nothing leaked and the
fencing invariant held. A benchmark, not a test: run it as root, read the report.

    python3 benches/soak.py                          # builds release binaries; 10 min, 200 agents
    python3 benches/soak.py --minutes 2 --agents 50 --json soak.json
    python3 benches/soak.py --no-build --bin-dir target/debug --minutes 1   # quick check

Setup (names carry `mls<pid>`): a router namespace and two simulated providers; the coordinator
(`meshlink-coordinator serve`, SQLite) on provider 1 (198.18.1.10); real agents vm-a (provider
1), vm-b and vm-c (provider 2) run `meshlink-agent up` in their own namespaces. Traffic for the
whole run: iperf3 TCP from vm-b to vm-a's node address at a capped rate (`--iperf-rate`), ping
every 20 ms from vm-c to the workload only real agents hold (`soak-real`, moved between them by
the churn), ping every 200 ms from vm-a to vm-c.

`meshlink-soak` (benches/soak) runs in the coordinator's namespace: `--agents` simulated agents,
each the real `AgentSession` over its own QUIC connection, join; `--workloads` workloads are
created; then for `--minutes` it churns (leave and come back, crash and restart from the cached
map, holders cut off to force failovers, claims, moves to simulated and real nodes, detaches,
revocations, deletions, workloads deleted and created again) and checks the fencing invariant:
every 5 ms on every simulated agent (`Holdings::held`), every ~300 ms on each real agent
(`meshlink-agent status`), and across the two (see benches/soak/src/fencing.rs). Then the
churn stops, every agent comes back, and the soak waits until every agent, simulated and real,
has the coordinator's map version and generations with exactly each holder answering.

Measured by this script, every `--sample` seconds from before the fleet starts to the end: the
coordinator's RSS (VmRSS), open fds, threads, the tasks alive in its runtime and its sessions
(admin `status`: `tasks`); the same of each real agent (RSS, fds, threads; tasks from its
`status`, `runtime.tasks`). After the fleet leaves, every simulated node and the shared
workloads are deleted through the admin API, so the network is back to its start (three real
agents, one workload), and after a pause the leak checks compare with the baseline taken before
the fleet started:
  - coordinator: sessions online back to 3; fds, threads and runtime tasks back to the
    baseline (within `--fd-slack` / 2 threads / `--task-slack`);
  - each real agent: its WireGuard peers (`wg show IFACE peers`) are exactly the other real
    agents (no leaked tunnels); the routes on its interface are exactly its peers' allowed IPs
    (`status`); its addresses are its own plus the workload it holds, nothing else; fds,
    threads and runtime tasks back to the baseline;
  - memory growth: the least-squares slope of RSS over the second half of the churn, in KiB per
    minute; judged against `--max-slope-kib` (default 256 KiB/min for the coordinator and
    each agent, about 15 MiB an hour), not a single sample. Beside it, the slope of the
    anonymous part of RSS (`RssAnon`: heap and stacks, without the binary's own pages, which
    are read in from its file as code runs for the first time), to tell the two apart; the
    verdict is on the whole RSS.
The report is markdown; `--json` keeps every sample. Only python3's standard library is used;
everything made is removed on exit, Ctrl-C or SIGTERM.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bed import Bed, log, run, tail, token_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK, NETWORK_CIDR = "soak", "100.64.0.0/16"
REAL_WORKLOAD, REAL_WORKLOAD_IP = "soak-real", "100.64.201.1"
WORKLOAD_BASE = "100.64.200.0"
QUIC_PORT, ADMIN_PORT, IPERF_PORT = 7443, 7444, 5201
HOSTS = [("c0", 1, 10), ("a", 1, 11), ("b", 2, 10), ("c", 2, 11)]
AGENTS = ["a", "b", "c"]


def proc_figures(pid):
    """RSS (KiB; also its anonymous part: the heap and stacks, without the binary's pages read
    in from its file as new code runs), open fds and threads of process `pid`, or None when
    it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(line.split(":", 1) for line in f if ":" in line)
        rss = int(st["VmRSS"].split()[0])
        anon = int(st["RssAnon"].split()[0])
        threads = int(st["Threads"])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, KeyError, ValueError):
        return None
    return {"rss_kib": rss, "rss_anon_kib": anon, "fds": fds, "threads": threads}


def slope_per_min(points):
    """Least-squares slope of (seconds, value) points, per minute; None with fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 60 * sum((t - mx) * (v - my) for t, v in points) / sxx


class Soak(Bed):
    def __init__(self, opts):
        super().__init__(opts, prefix=f"mls{os.getpid()}", providers=2, hosts=HOSTS)
        self.state = os.path.join(self.tmp, "coordinator")
        self.agents = {}
        self.samples = []
        self.sampling = threading.Event()
        self.phase = "setup"
        self.t0 = time.monotonic()

    def iface(self, h):
        return f"{self.prefix}{h}"

    def meshctl(self, *args, check=True):
        return run(["ip", "netns", "exec", self.ns_name("c0"), self.bin("meshctl"),
                    "--coordinator", f"http://127.0.0.1:{ADMIN_PORT}",
                    "--admin-token-file", os.path.join(self.state, "admin.token"), *args], check=check)

    def start(self):
        self.coord = self.spawn("c0", [self.bin("meshlink-coordinator"), "serve", "--state-dir", self.state,
                                       "--listen", f"0.0.0.0:{QUIC_PORT}",
                                       "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                                       "--advertise", f"198.18.1.10:{QUIC_PORT}"], "coordinator.log")
        self.wait_for("the coordinator's fingerprint line", 30,
                      lambda: "coordinator fingerprint:" in tail(self.coord.log_path, 200), self.coord)
        self.meshctl("network", "create", NETWORK, "--cidr", NETWORK_CIDR)
        token = json.loads(self.meshctl("token", "create", "--network", NETWORK, "--uses", "3",
                                        "--expires", "1h", "-o", "json"))["token"]
        for h in AGENTS:
            iface = self.iface(h)
            self.interfaces.append(iface)
            path = token_file(self.tmp, f"vm-{h}", token)
            env = dict(kv.split("=", 1) for kv in self.opts.agent_env)
            self.agents[h] = self.spawn_in(self.ns_name(h), [
                self.bin("meshlink-agent"), "up", "--token-file", path, "--name", f"vm-{h}",
                "--state-dir", os.path.join(self.tmp, f"state-{h}"), "--interface", iface], f"agent-{h}.log", env=env)
        self.wait_for("three nodes online", 60, lambda: self.online() == 3)
        self.addr = {h: self.agent_status(h)["addresses"][0].split("/")[0] for h in AGENTS}
        self.wait_for("vm-b reaching vm-a", 30, lambda: subprocess.run(
            ["ip", "netns", "exec", self.ns_name("b"), "ping", "-c1", "-W1", self.addr["a"]],
            capture_output=True).returncode == 0)

    def online(self):
        out = self.meshctl("node", "list", "--network", NETWORK, "-o", "json", check=False)
        try:
            return sum(1 for n in json.loads(out) if n.get("online"))
        except (json.JSONDecodeError, TypeError):
            return -1

    def status(self):
        try:
            return json.loads(self.meshctl("status", "-o", "json"))
        except (RuntimeError, json.JSONDecodeError):
            return None

    def agent_status(self, h):
        return json.loads(run(["ip", "netns", "exec", self.ns_name(h), self.bin("meshlink-agent"), "status",
                               "--interface", self.iface(h), "-o", "json"]))

    def start_traffic(self, seconds):
        self.spawn("a", ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3-server.log")
        time.sleep(0.5)
        self.iperf = self.spawn("b", ["iperf3", "-c", self.addr["a"], "-p", str(IPERF_PORT), "-t", str(int(seconds)),
                                      "-b", self.opts.iperf_rate, "-i", "10", "--forceflush",
                                      "--connect-timeout", "5000"],
                                "iperf3-client.log")
        self.ping_wl = self.spawn("c", ["ping", "-i", "0.02", "-W", "1", REAL_WORKLOAD_IP], "ping-workload.log")
        self.ping_node = self.spawn("a", ["ping", "-i", "0.2", "-W", "1", self.addr["c"]], "ping-node.log")

    def sample(self):
        s = {"t": round(time.monotonic() - self.t0, 2), "phase": self.phase,
             "coordinator": proc_figures(self.coord.pid)}
        for h in AGENTS:
            s[f"vm-{h}"] = proc_figures(self.agents[h].pid)
        st = self.status()
        if st is not None:
            s["online"] = st.get("online")
            s["sessions"] = sum(c.get("sessions", 0) for c in st.get("coordinators") or [])
            s["coordinator"]["tasks"] = st.get("tasks")
        for h in AGENTS:
            if s[f"vm-{h}"] is not None:
                s[f"vm-{h}"]["tasks"] = self.agent_tasks(h)
        return s

    def agent_tasks(self, h):
        """The tasks alive in agent `h`'s runtime (its status), or None when it does not say."""
        try:
            return (self.agent_status(h).get("runtime") or {}).get("tasks")
        except (RuntimeError, OSError, ValueError):
            return None

    def sampler(self):
        while not self.sampling.wait(self.opts.sample):
            self.samples.append(self.sample())

    def run_fleet(self):
        args = [self.bin("meshlink-soak"), "--server", f"127.0.0.1:{QUIC_PORT}",
                "--admin", f"http://127.0.0.1:{ADMIN_PORT}",
                "--admin-token-file", os.path.join(self.state, "admin.token"), "--network", NETWORK,
                "--agents", str(self.opts.agents), "--workloads", str(self.opts.workloads),
                "--workload-base", WORKLOAD_BASE, "--duration-secs", str(int(self.opts.minutes * 60)),
                "--action-ms", str(self.opts.action_ms), "--agent-bin", self.bin("meshlink-agent"),
                "--real-workload", f"{REAL_WORKLOAD}={REAL_WORKLOAD_IP}",
                "--json", os.path.join(self.tmp, "fleet.json")]
        for h in AGENTS:
            args += ["--real", f"vm-{h}={self.iface(h)}"]
        if self.opts.seed is not None:
            args += ["--seed", str(self.opts.seed)]
        fleet = self.spawn("c0", args, "fleet.log")
        self.phase = "churn"
        fleet.wait()
        self.untrack(fleet)
        self.phase = "after"
        try:
            with open(os.path.join(self.tmp, "fleet.json")) as f:
                return fleet.returncode, json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RuntimeError(f"meshlink-soak left no report ({fleet.returncode}): {e}:\n{tail(fleet.log_path)}")

    def clear_fleet(self):
        """Deletes every simulated node and every shared workload: back to the start's network."""
        nodes = json.loads(self.meshctl("node", "list", "--network", NETWORK, "-o", "json"))
        real = {f"vm-{h}" for h in AGENTS}
        for n in nodes:
            if n["name"] not in real:
                self.meshctl("node", "delete", str(n["name"]), "--network", NETWORK, check=False)
        for w in json.loads(self.meshctl("workload", "list", "--network", NETWORK, "-o", "json")):
            if w["name"] != REAL_WORKLOAD:
                self.meshctl("workload", "delete", w["name"], "--network", NETWORK, check=False)

    def leak_checks(self, baseline, after):
        """Each check: (what, expected, seen, ok)."""
        checks = []
        st = self.status() or {}
        checks.append(("coordinator: nodes online", 3, st.get("online"), st.get("online") == 3))
        sessions = sum(c.get("sessions", 0) for c in st.get("coordinators") or [])
        checks.append(("coordinator: sessions (status)", 3, sessions, sessions == 3))
        b, a = baseline["coordinator"], after["coordinator"]
        checks.append(("coordinator: open fds", b["fds"], a["fds"], a["fds"] <= b["fds"] + self.opts.fd_slack))
        checks.append(("coordinator: threads", b["threads"], a["threads"], a["threads"] <= b["threads"] + 2))
        checks.append(tasks_check("coordinator", b, a, self.opts.task_slack))
        names = json.loads(self.meshctl("node", "list", "--network", NETWORK, "-o", "json"))
        keys = {n["name"]: n["public_key"] for n in names if not n.get("revoked")}
        wl = json.loads(self.meshctl("workload", "show", REAL_WORKLOAD, "--network", NETWORK, "-o", "json"))
        holder = (wl.get("holder") or {}).get("name")
        for h in AGENTS:
            me = f"vm-{h}"
            s = self.agent_status(h)
            want_peers = sorted(k for n, k in keys.items() if n != me)
            wg = run(["wg", "show", self.iface(h), "peers"]).split()
            checks.append((f"{me}: WireGuard peers (wg show)", len(want_peers), len(wg), sorted(wg) == want_peers))
            allowed = sorted({ip for p in s.get("peers") or [] for ip in p.get("allowed_ips") or []})
            routes = json.loads(run(["ip", "-n", self.ns_name(h), "-j", "route", "show", "dev", self.iface(h)]) or "[]")
            dsts = sorted(r["dst"] if "/" in r["dst"] else r["dst"] + "/32" for r in routes
                          if r.get("protocol") != "kernel")
            checks.append((f"{me}: routes on {self.iface(h)}", " ".join(allowed), " ".join(dsts), dsts == allowed))
            own = [x.split("/")[0] for x in s.get("addresses") or []]
            want = sorted(own + ([REAL_WORKLOAD_IP] if holder == me else []))
            ai = json.loads(run(["ip", "-n", self.ns_name(h), "-j", "addr", "show", "dev", self.iface(h)]) or "[]")
            have = sorted(x["local"] for i in ai for x in i.get("addr_info", []) if x.get("family") == "inet")
            checks.append((f"{me}: addresses on {self.iface(h)}", " ".join(want), " ".join(have), have == want))
            b, a = baseline[me], after[me]
            checks.append((f"{me}: open fds", b["fds"], a["fds"], a["fds"] <= b["fds"] + self.opts.fd_slack))
            checks.append((f"{me}: threads", b["threads"], a["threads"], a["threads"] <= b["threads"] + 2))
            checks.append(tasks_check(me, b, a, self.opts.task_slack))
        return checks


def tasks_check(who, b, a, slack):
    """The leak check of a process's runtime tasks: back to the baseline within `slack`."""
    bt, at = b.get("tasks"), a.get("tasks")
    ok = bt is not None and at is not None and at <= bt + slack
    return (f"{who}: runtime tasks", bt, at, ok)


def ping_loss(path):
    """(sent, received, first) from a ping log ended by SIGINT/SIGTERM, counting reply lines:
    `sent` is the highest sequence number answered, `first` the lowest (the pings before it
    went to an address nobody answered for yet: the workload is attached after the ping
    starts), and the unanswered sequence numbers between the two."""
    seqs = set()
    # ICMP sequence numbers wrap at 65,536 (22 minutes at 20 ms): unwrapped by the order of
    # the replies, which never trail by half the range.
    wraps, last = 0, None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if "icmp_seq=" in line and "bytes from" in line:
                    try:
                        q = int(line.split("icmp_seq=")[1].split()[0])
                    except (IndexError, ValueError):
                        continue
                    if last is not None and q < last - 32768:
                        wraps += 1
                    last = q
                    seqs.add(q + 65536 * wraps)
    except OSError:
        pass
    if not seqs:
        return {"sent": 0, "received": 0, "first": None, "lost": []}
    first, last = min(seqs), max(seqs)
    return {"sent": last, "received": len(seqs), "first": first,
            "lost": [q for q in range(first, last + 1) if q not in seqs]}


def growth(samples, key, start, end, figure="rss_kib"):
    """The slope of `key`'s `figure` (KiB/min) over the second half of [start, end]."""
    mid = (start + end) / 2
    pts = [(s["t"], s[key][figure]) for s in samples
           if mid <= s["t"] <= end and s.get(key)]
    return slope_per_min(pts), len(pts)


def report(res, opts):
    f = res["fleet"]
    print(f"## Churn soak: {opts.agents} simulated agents, {opts.minutes} min, 3 real agents"
          + (f" ({' '.join(opts.agent_env)})" if opts.agent_env else "") + "\n")
    print(f"Fleet exit status {res['fleet_status']}; ok: {f.get('ok')}; seed {f.get('seed')}")
    print(f"Ramp {f.get('ramp_s', 0):.1f} s; converged after the churn: {f.get('converged')} "
          f"({f.get('converged_after_s')} s)")
    if f.get("not_converged"):
        print("Not converged: " + "; ".join(f["not_converged"][:10]))
    print("\nFleet: " + ", ".join(f"{k} {v}" for k, v in f.get("fleet", {}).items()))
    print("\nOperator actions: " + "; ".join(
        f"{a}: " + ", ".join(f"{o} {n}" for o, n in outs.items())
        for a, outs in f.get("actions", {}).get("actions", {}).items()))
    fe = f.get("fencing", {})
    print(f"\nFencing: {fe.get('sim_snapshots')} snapshots of the simulated fleet (longest gap "
          f"{fe.get('longest_snapshot_gap_ms', 0):.1f} ms), {fe.get('real_observations')} observations of real "
          f"agents (widest window {fe.get('widest_real_window_ms', 0):.1f} ms, {fe.get('real_observation_errors')} "
          f"errors), {fe.get('holding_runs')} holding runs; breaches: {len(fe.get('breaches', []))}")
    for b in fe.get("breaches", [])[:20]:
        w = b.get("workloads") or [None, None]
        kind = ("a workload deleted and another created at its address" if None not in w and w[0] != w[1]
                else "one workload")
        print(f"  BREACH {b['address']}: nodes {b['nodes'][0]} and {b['nodes'][1]} (node, generation, real) "
              f"at once from {b['from_ms'] / 1e3:.3f} s to {b['to_ms'] / 1e3:.3f} s ({kind}; workload ids {w})")
    print("\n| leak check | baseline / expected | after | ok |\n|---|---|---|---|")
    for what, want, seen, ok in res["checks"]:
        print(f"| {what} | {want} | {seen} | {'yes' if ok else '**NO**'} |")
    print(f"\n| memory (second half of the churn) | RSS at its start | RSS at its end | slope KiB/min | "
          f"samples | within {opts.max_slope_kib} KiB/min | anonymous RSS slope KiB/min |\n"
          f"|---|---|---|---|---|---|---|")
    for key, (slope, n, first, last) in res["growth"].items():
        ok = slope is not None and slope <= opts.max_slope_kib
        anon = res.get("anon_growth", {}).get(key)
        print(f"| {key} | {first} KiB | {last} KiB | {slope if slope is None else round(slope, 1)} | {n} | "
              f"{'yes' if ok else '**NO**'} | {'-' if anon is None else round(anon, 1)} |")
    print("\n| process | RSS KiB: baseline / peak in the churn / after | fds: baseline / peak / after | "
          "threads: baseline / peak / after | runtime tasks: baseline / peak / after |\n|---|---|---|---|---|")
    for key in ["coordinator"] + [f"vm-{h}" for h in AGENTS]:
        pts = [s[key] for s in res["samples"] if s.get(key) and s["phase"] == "churn"]
        b, a = res["samples"][0].get(key), res["samples"][-1].get(key)
        if pts and a and b:
            def peak(k):
                return max((p[k] for p in pts if p.get(k) is not None), default=None)
            print(" | ".join([f"| {key}"] + [f"{b.get(k)} / {peak(k)} / {a.get(k)}"
                                             for k in ("rss_kib", "fds", "threads", "tasks")]) + " |")
    wl, node = res["ping_workload"], res["ping_node"]
    since = wl["sent"] - wl["first"] + 1 if wl["first"] is not None else 0
    print(f"\nTraffic: ping to {REAL_WORKLOAD} every 20 ms: {wl['received']} of the {since} sent "
          f"since it first answered (icmp_seq {wl['first']}; the {(wl['first'] or 1) - 1} before went "
          f"out before the workload was attached), lost: {len(wl['lost'])} {wl['lost'][:50]}; "
          f"ping vm-a -> vm-c: {node['received']} of {node['sent']} (lost {len(node['lost'])}); "
          f"iperf3: {res['iperf']}")


def iperf_summary(path):
    """Mean and lowest of iperf3's 10 s interval rates (Mbit/s); the run is ended by cleanup,
    so there is no final summary."""
    rates = []
    try:
        with open(path, errors="replace") as f:
            for ln in f:
                parts = ln.split()
                units = [i for i, p in enumerate(parts) if p.endswith("bits/sec")]
                if "sec" in parts and units and "receiver" not in parts and "sender" not in parts:
                    try:
                        v, unit = float(parts[units[0] - 1]), parts[units[0]]
                    except ValueError:
                        continue
                    rates.append(v * {"Gbits/sec": 1000, "Mbits/sec": 1, "Kbits/sec": 0.001}.get(unit, 0))
    except OSError:
        return "no log"
    if not rates:
        return "no intervals"
    return f"{len(rates)} intervals of 10 s, mean {sum(rates) / len(rates):.1f} Mbit/s, lowest {min(rates):.1f} Mbit/s"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--workloads", type=int, default=20)
    ap.add_argument("--action-ms", type=int, default=50, help="mean pause between two churn actions")
    ap.add_argument("--sample", type=float, default=5, help="seconds between two resource samples")
    ap.add_argument("--iperf-rate", default="20M", help="iperf3 -b for vm-b -> vm-a")
    ap.add_argument("--fd-slack", type=int, default=2, help="fds above the baseline still passing")
    ap.add_argument("--task-slack", type=int, default=4,
                    help="runtime tasks above the baseline still passing (timers come and go)")
    ap.add_argument("--max-slope-kib", type=float, default=256, help="KiB/min of RSS growth still passing")
    ap.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the real agents, e.g. MALLOC_ARENA_MAX=1 (repeatable)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release"))
    ap.add_argument("--json", help="write every figure and sample here")
    ap.add_argument("--keep-logs", action="store_true")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespaces and TUN devices)")
    if not opts.no_build:
        log("building release binaries ...")
        run(["cargo", "build", "--release", "-q", "-p", "meshlink-agent", "-p", "meshlink-coordinator",
             "-p", "meshctl", "-p", "meshlink-soak"], cwd=REPO, capture=False)
    bench = Soak(opts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ok = False
    try:
        bench.setup()
        bench.start()
        bench.start_traffic(opts.minutes * 60 + 300)
        time.sleep(2)
        baseline = bench.sample()
        bench.samples.append(baseline)
        sampler = threading.Thread(target=bench.sampler, daemon=True)
        sampler.start()
        churn_start = time.monotonic() - bench.t0
        status, fleet = bench.run_fleet()
        churn_end = time.monotonic() - bench.t0
        log("fleet done; deleting the simulated nodes and shared workloads")
        bench.wait_for("the simulated sessions to end", 60, lambda: bench.online() == 3)
        bench.clear_fleet()
        time.sleep(10)
        bench.phase = "end"
        after = bench.sample()
        bench.samples.append(after)
        bench.sampling.set()
        sampler.join()
        checks = bench.leak_checks(baseline, after)
        for p in (bench.ping_wl, bench.ping_node):
            p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        # The fleet's own ramp is not part of the churn's second half.
        start = churn_start + fleet.get("ramp_s", 0)
        res = {"fleet_status": status, "fleet": fleet, "checks": checks, "samples": bench.samples,
               "growth": {}, "ping_workload": ping_loss(bench.ping_wl.log_path),
               "ping_node": ping_loss(bench.ping_node.log_path),
               "iperf": iperf_summary(bench.iperf.log_path), "machine": bench.environment(),
               "commit": run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=False).strip()}
        for key in ["coordinator"] + [f"vm-{h}" for h in AGENTS]:
            slope, n = growth(bench.samples, key, start, churn_end)
            mid = (start + churn_end) / 2
            half = [s[key]["rss_kib"] for s in bench.samples if mid <= s["t"] <= churn_end and s.get(key)]
            res["growth"][key] = (slope, n, half[0] if half else None, half[-1] if half else None)
            res.setdefault("anon_growth", {})[key] = growth(bench.samples, key, start, churn_end,
                                                            "rss_anon_kib")[0]
        report(res, opts)
        ok = (status == 0 and all(c[3] for c in checks)
              and all(g[0] is not None and g[0] <= opts.max_slope_kib for g in res["growth"].values()))
        print(f"\nVerdict: {'PASS' if ok else 'FAIL'}")
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump({"options": vars(opts), **res}, f, indent=1)
    except BaseException:
        log(f"logs: {bench.tmp}")
        opts.keep_logs = True
        raise
    finally:
        bench.sampling.set()
        bench.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
