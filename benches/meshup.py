#!/usr/bin/env python3
"""Time for a fresh mesh to come up: three agents join with a token until every pair pings.

One command, as root:

    python3 benches/meshup.py                   # builds the release binaries; 5 rounds
    python3 benches/meshup.py --rounds 10 --json meshup.json
    python3 benches/meshup.py --no-build --bin-dir target/debug    # quick check, debug build

Setup (the same bed as tests/tests/mesh.rs): a router namespace with one bridge per simulated
provider, provider A on 198.18.1.0/24 and provider B on 198.18.2.0/24 (router .1 on each, IPv4
forwarding on); every host has one veth to its provider's bridge and routes 198.18.0.0/15 via
its router, with no default route. The coordinator runs on A (198.18.1.10); vm-a1 (198.18.1.11)
and vm-a2 (198.18.1.12) on A, vm-b1 (198.18.2.10) on B. Overlay: the coordinator's pool,
100.64.0.0/16.

Each round starts a fresh coordinator (new state directory, network, token with 3 uses), then
starts the three `meshlink-agent up --token-file ...` processes at once, with fresh state
directories, and measures from that moment:
  - join: each agent's process start to its node appearing in `meshctl node list` (polled
    every 20 ms in the coordinator's namespace);
  - mesh up: until all 6 ordered pairs have answered a ping over the overlay. Per pair, a
    background `ping -c 1 -w T -i 0.01 -D` starts as soon as both ends are listed (restarted
    while the source has no route yet); its first reply's timestamp counts.
The report is a markdown table of median, min and max over rounds. Everything runs on this
machine, so the pollers and pingers share its cores with the agents and the coordinator.

Only python3's standard library is used. Everything made (namespaces, veths, processes,
UAPI sockets, temp files) is removed on exit, also on Ctrl-C or SIGTERM; daemons also get
SIGTERM if this script is killed outright (`setpriv --pdeathsig`). Names carry the prefix
`mlm<pid>` so two runs never collide. No packet leaves the namespaces.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bed import (Bed, cargo_build, interrupt_on, log, pings, publish, release_dir,  # noqa: E402
                 remove_uapi_socket, root_and_tun, run, tail, token_file)

NETWORK, NETWORK_CIDR = "bench", "100.64.0.0/16"
QUIC_PORT, ADMIN_PORT = 7443, 7444
# (host, provider octet, last octet); the coordinator is "c".
HOSTS = [("c", 1, 10), ("a1", 1, 11), ("a2", 1, 12), ("b1", 2, 10)]
AGENTS = ["a1", "a2", "b1"]


class Bench(Bed):
    """Owns everything the run creates; `cleanup` removes it all."""

    def __init__(self, opts):
        super().__init__(opts, f"mlm{os.getpid()}", providers=2, hosts=HOSTS)

    def meshctl(self, state_dir, *args, check=True):
        return run(["ip", "netns", "exec", self.ns_name("c"), self.bin("meshctl"),
                    "--coordinator", f"http://127.0.0.1:{ADMIN_PORT}",
                    "--admin-token-file", os.path.join(state_dir, "admin.token"), *args], check=check)

    # ---- topology -------------------------------------------------------------------------

    def setup(self):
        super().setup()
        self.wait_for("underlay pings across the router", 10,
                      lambda: pings(self.ns_name("b1"), "198.18.1.10") and pings(self.ns_name("a1"), "198.18.2.10"))

    # ---- one round ------------------------------------------------------------------------

    def start_coordinator(self, rnd):
        state = os.path.join(self.tmp, f"coordinator-{rnd}")
        proc = self.spawn("c", [self.bin("meshlink-coordinator"), "serve", "--state-dir", state,
                                "--listen", f"0.0.0.0:{QUIC_PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                                "--advertise", f"198.18.1.10:{QUIC_PORT}"], f"coordinator-{rnd}.log")
        self.wait_for("the coordinator's fingerprint line", 20,
                      lambda: "coordinator fingerprint:" in tail(proc.log_path, 200), proc)
        self.meshctl(state, "network", "create", NETWORK, "--cidr", NETWORK_CIDR)
        token = json.loads(self.meshctl(state, "token", "create", "--network", NETWORK, "--uses", "3",
                                        "--expires", "1h", "-o", "json"))["token"]
        return proc, state, token

    def pinger(self, src, dst, deadline, replies, key, stop):
        """Pings dst from src every 10 ms until the first reply; stores its timestamp."""
        while not stop.is_set():
            left = deadline - time.time()
            if left <= 0:
                return
            proc = self.track(subprocess.Popen(  # ended in round()'s cleanup if still running
                ["ip", "netns", "exec", self.ns_name(src), "ping", "-n", "-D", "-c", "1", "-i", "0.01",
                 "-w", str(max(1, int(left))), dst],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
            out, _ = proc.communicate()
            self.untrack(proc)
            m = re.search(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)
            if m:
                replies[key] = float(m.group(1))
                return
            # No route yet (the source's agent has not joined): ping exits at once; try again.
            time.sleep(0.005)

    def round(self, rnd):
        coord, state, token = self.start_coordinator(rnd)
        agents, joined, addrs, replies = {}, {}, {}, {}
        stop = threading.Event()
        threads = []
        try:
            spawned = {}
            for h in AGENTS:
                iface = f"{self.prefix}{h}{rnd}"
                self.interfaces.append(iface)
                spawned[h] = time.time()
                path = token_file(self.tmp, f"r{rnd}-{h}", token)
                agents[h] = self.spawn(h, [self.bin("meshlink-agent"), "up", "--token-file", path,
                                           "--name", f"vm-{h}", "--label", f"provider={h[0]}",
                                           "--state-dir", os.path.join(self.tmp, f"r{rnd}-{h}"),
                                           "--interface", iface], f"r{rnd}-{h}.log")
            t0 = min(spawned.values())
            deadline = t0 + self.opts.timeout
            pairs = [(s, d) for s in AGENTS for d in AGENTS if s != d]
            started = set()
            # Poll the node list; start each pair's pinger once its destination is listed.
            while len(replies) < len(pairs):
                if time.time() > deadline:
                    missing = [f"vm-{s}->vm-{d}" for s, d in pairs if (s, d) not in replies]
                    raise RuntimeError(f"round {rnd}: no reply within {self.opts.timeout}s on "
                                       f"{', '.join(missing)}; joined: {sorted(joined)}")
                for h, proc in agents.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"vm-{h} exited ({proc.returncode}):\n{tail(proc.log_path)}")
                if len(joined) < len(AGENTS):
                    out = self.meshctl(state, "node", "list", "-o", "json", check=False)
                    seen = time.time()
                    try:
                        nodes = json.loads(out)
                    except json.JSONDecodeError:
                        nodes = []
                    for n in nodes:
                        h = n["name"].removeprefix("vm-")
                        if h in AGENTS and h not in joined:
                            joined[h] = seen
                            addrs[h] = n["address"]
                for s, d in pairs:
                    if (s, d) not in started and s in addrs and d in addrs:
                        started.add((s, d))
                        t = threading.Thread(target=self.pinger,
                                             args=(s, addrs[d], deadline, replies, (s, d), stop), daemon=True)
                        t.start()
                        threads.append(t)
                time.sleep(0.02)
            return {
                "join_ms": {h: 1000 * (joined[h] - spawned[h]) for h in AGENTS},
                "first_join_ms": 1000 * min(joined[h] - spawned[h] for h in AGENTS),
                "all_joined_ms": 1000 * (max(joined.values()) - t0),
                "mesh_up_ms": 1000 * (max(replies.values()) - t0),
                "pair_ms": {f"vm-{s}->vm-{d}": 1000 * (replies[(s, d)] - t0) for s, d in pairs},
                "addresses": {f"vm-{h}": addrs[h] for h in AGENTS},
            }
        finally:
            stop.set()
            with self.lock:
                running = [p for p in self.procs if p is not coord and p not in agents.values()]
            for proc in running:  # pingers still waiting for a reply (a failed round)
                self.stop(proc, grace=1)
            for t in threads:
                t.join(5)
            for proc in agents.values():
                self.stop(proc)
            self.stop(coord)
            for h in AGENTS:
                sock = remove_uapi_socket(f"{self.prefix}{h}{rnd}")
                if sock:
                    log(f"warning: {sock} left behind by the agent; removing it")


# ---- reporting ------------------------------------------------------------------------------

def row(label, values):
    return (f"| {label} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} "
            f"| {len(values)} |")


def report(results, opts):
    lines = [
        f"Mesh formation: coordinator + 3 agents on 2 providers (router between them), "
        f"{opts.rounds} round(s), fresh coordinator and agent state each round; binaries from "
        f"`{opts.bin_dir}`. Times in ms from starting the 3 `meshlink-agent up --token-file` processes.",
        "",
        "| measurement | median ms | min ms | max ms | samples |",
        "|---|---|---|---|---|",
        row("first join (agent start to its node in `meshctl node list`)",
            [r["first_join_ms"] for r in results]),
        row("join, every agent (agent start to its node listed)",
            [v for r in results for v in r["join_ms"].values()]),
        row("all 3 nodes listed", [r["all_joined_ms"] for r in results]),
        row("mesh up: all 6 ordered pairs answered a ping", [r["mesh_up_ms"] for r in results]),
        row("mesh up after the last join", [r["mesh_up_ms"] - r["all_joined_ms"] for r in results]),
        row("one pair answered (every pair of every round)",
            [v for r in results for v in r["pair_ms"].values()]),
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    p.add_argument("--timeout", type=float, default=30, help="seconds a round may take (30)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    p.add_argument("--bin-dir", help="where the binaries are (default: <target>/release)")
    p.add_argument("--json", help="also write every sample to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with daemon logs")
    opts = p.parse_args()
    if opts.rounds < 1:
        p.error("--rounds must be at least 1")

    if not root_and_tun():
        return 1
    missing = sorted(t for t in ("ip", "ping", "setpriv") if not shutil.which(t))
    if missing:
        print(f"missing tools: {', '.join(missing)}; apt-get install -y iproute2 iputils-ping util-linux",
              file=sys.stderr)
        return 1

    opts.bin_dir = os.path.abspath(opts.bin_dir or release_dir())
    if not opts.no_build:
        cargo_build("meshlink-agent", "meshlink-coordinator", "meshctl")
    for name in ("meshlink-agent", "meshlink-coordinator", "meshctl"):
        path = os.path.join(opts.bin_dir, name)
        if not os.access(path, os.X_OK):
            print(f"{path} not found: build it, or pass --bin-dir", file=sys.stderr)
            return 1

    bench = Bench(opts)

    # Turn SIGINT (also when started in the background, where it is ignored by default),
    # SIGTERM and SIGHUP into an exception so the `finally` below cleans up.
    interrupt_on(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    results = []
    try:
        bench.setup()
        for rnd in range(1, opts.rounds + 1):
            r = bench.round(rnd)
            results.append(r)
            joins = ", ".join(f"vm-{h} {v:.0f}" for h, v in r["join_ms"].items())
            log(f"round {rnd}/{opts.rounds}: joins {joins} ms; all listed {r['all_joined_ms']:.0f} ms; "
                f"mesh up {r['mesh_up_ms']:.0f} ms")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        bench.cleanup()

    publish(report(results, opts), Bed.environment(), opts, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
