#!/usr/bin/env python3
"""Workload moves under a steady probe: how fast traffic follows a workload address, and what
is lost on the way.

One command, as root:

    python3 benches/wlmove.py                    # builds the release binaries; 20 moves, 5 failovers
    python3 benches/wlmove.py --moves 40 --failovers 10 --json wlmove.json
    python3 benches/wlmove.py --no-build --bin-dir target/debug   # quick check, debug build
    python3 benches/wlmove.py --meshes 4 --moves 30 --failovers 0 # 120 moves in 4 fresh meshes
    python3 benches/wlmove.py --cold --meshes 50 --failovers 0      # 50 cold moves
    python3 benches/wlmove.py --unlisted --moves 100 --failovers 0  # to nodes not listed

Setup: three simulated providers (a router namespace with one bridge each: A on 198.18.1.0/24,
B on 198.18.2.0/24, C on 198.18.3.0/24; every host routes 198.18.0.0/15 via its provider's
router). The coordinator runs on A (198.18.1.10); vm-a on A, vm-b on B and vm-c on C run
`meshlink-agent up --token-file`. A workload `bench` (100.64.50.10) is created with vm-c as standby
and vm-a, vm-c as allowed holders, and attached to vm-a. vm-a and vm-c run
`meshlink-probe echo` on 0.0.0.0:7000 (answers carry the responder's name); vm-b runs
`meshlink-probe send` to 100.64.50.10:7000, one probe per millisecond.

Planned moves: the workload moves between vm-a and vm-c `--moves` times, one move every
`--gap` seconds, each requested through the admin API by a small client that runs in the
coordinator's namespace and stamps the request with CLOCK_REALTIME just before sending it (the
probes carry the same clock). Per move:
  - to new holder: from the request to the first probe answered by the new holder among the
    probes sent after the request;
  - lost: probes sent from the request until the next move's request (or the end of the run)
    that were never answered;
  - slowest probe round trip: the longest send-to-answer time among those probes (a probe kept
    back at the new holder until its handover is confirmed waits that long);
  - the coordinator's own figures from its answer: destination ready (tunnels up) and commit.
With `--meshes N` the moves run in N fresh meshes one after the other (everything made again:
namespaces, coordinator, agents, keys), `--moves` in each; failovers, restarts and kills run in
the last one. Right before each move the destination's status is read: a move whose destination
has not completed a handshake with any peer yet is counted as *cold* and reported apart. With
`--cold`, vm-c's agent is started only once the probe runs, and the first move of each mesh goes
to it the moment the coordinator shows it online (agents set a persistent keepalive, so a node up
for a second has sessions with every peer: only a node that has just joined is cold). With `--unlisted` the workload
has no standby and no allowed holder: every move goes to a node the workload does not list
(failovers need a standby, so `--failovers` must be 0). After the moves each agent's drop counters are read from its status, with its
`handover` counters: where packets to the workload address went at the new holder (kept back
until the handover was confirmed, released, or dropped: full, timed out, abandoned, not held).
Failover: `--failovers` times, with the workload on vm-a, vm-a's agent is killed (SIGKILL: the
tunnel interface and with it the address vanish, the coordinator hears nothing); failover time
is from the kill to the first probe answered by vm-c among those sent after the kill. Then vm-a's
agent is restarted and the workload moved back.
Coordinator restarts: `--restarts` times, with the workload on vm-a under the probe, the
coordinator is killed (SIGKILL; with `--orderly`, stopped with SIGTERM as an upgrade does, which
first gives holders its stop lease) and started again on the same state directory `--outage`
seconds after it ended; per round: probes lost from the kill on, the longest silence of the workload
address (send time of the last answered probe before a run of lost ones to that of the first
answered one after it), and the time from the new start to every agent online.

Several coordinators (`--ha N`, 2 or 3): the coordinators run on providers A, B (198.18.2.11)
and C (198.18.3.11), sharing a private PostgreSQL cluster the bench starts (Debian's
`postgresql` package), with one identity and the same `--coordinators` list. `--kills` times,
with the workload on vm-a under the probe, the coordinator vm-a's agent is connected to is
SIGKILLed (and started again once the round is over); per round: probes lost from the kill on,
the longest silence of the workload address, and for each agent the time from the kill until
its status shows it connected to another coordinator (polled every ~20 ms).

The report is a markdown table; `--json` keeps every figure. Only python3's standard library
is used; everything made is removed on exit (names carry `mlw<pid>`), also on Ctrl-C.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bed import Bed, PgCluster, log, run, tail, token_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK, NETWORK_CIDR = "bench", "100.64.0.0/16"
WORKLOAD, WORKLOAD_IP, PORT = "bench", "100.64.50.10", 7000
QUIC_PORT, ADMIN_PORT = 7443, 7444
# (host, provider, last octet); the coordinator is "c0".
HOSTS = [("c0", 1, 10), ("a", 1, 11), ("b", 2, 10), ("c", 3, 10)]
AGENTS = ["a", "b", "c"]

# Runs inside the coordinator's namespace: reads `move NODE` lines, answers one JSON line each
# with the request's CLOCK_REALTIME stamp (ns) and the admin API's answer.
MOVER = r"""
import json, sys, time, urllib.request
base, token, name = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
for line in sys.stdin:
    verb, node = line.split()
    body = json.dumps({"node": node}).encode()
    req = urllib.request.Request(f"{base}/v1/workloads/{name}/{verb}", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    t_req = time.time_ns()
    with urllib.request.urlopen(req, timeout=10) as r:
        answer = json.loads(r.read())
    t_resp = time.time_ns()
    print(json.dumps({"t_req": t_req, "t_resp": t_resp, "answer": answer}), flush=True)
"""


# With --ha: the other coordinators' hosts (name, provider, last octet).
HA_HOSTS = [("c1", 2, 11), ("c2", 3, 11)]


class MoveBench(Bed):
    def __init__(self, opts):
        self.names = ["c0"] + [h for h, _, _ in HA_HOSTS[:max(0, opts.ha - 1)]]
        hosts = HOSTS + [h for h in HA_HOSTS if h[0] in self.names]
        super().__init__(opts, prefix=f"mlw{os.getpid()}", providers=3, hosts=hosts)
        self.addr = {h: f"198.18.{p}.{o}:{QUIC_PORT}" for h, p, o in hosts if h in self.names}
        self.coords = {}
        self.coord = self.state = self.pg = self.store = None
        self.admin_host = "c0"
        self.agents = {}
        self.echo = {}

    def state_of(self, name):
        return os.path.join(self.tmp, "coordinator" if name == "c0" else f"coordinator-{name}")

    def start_coordinator(self, log_name="coordinator.log", name="c0"):
        args = [self.bin("meshlink-coordinator"), "serve", "--state-dir", self.state_of(name),
                "--listen", f"0.0.0.0:{QUIC_PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                "--advertise", self.addr.get(name, f"198.18.1.10:{QUIC_PORT}")]
        if self.store:
            args += ["--store", self.store, "--coordinators", ",".join(self.addr[n] for n in self.names)]
        proc = self.spawn(name, args, log_name)
        self.wait_for(f"{name}'s fingerprint line", 20,
                      lambda: "coordinator fingerprint:" in tail(proc.log_path, 200), proc)
        self.coords[name] = proc
        if name == "c0":
            self.coord = proc

    def start(self):
        self.state = self.state_of("c0")
        if self.opts.ha >= 2:
            self.pg = PgCluster()
            self.store = self.pg.create_database("wlmove")
        self.start_coordinator()
        for name in self.names[1:]:
            os.makedirs(self.state_of(name), mode=0o700)
            for f in ("coordinator.crt", "coordinator.key", "admin.token"):
                shutil.copy2(os.path.join(self.state, f), os.path.join(self.state_of(name), f))
            self.start_coordinator(f"coordinator-{name}.log", name)
        self.meshctl("network", "create", NETWORK, "--cidr", NETWORK_CIDR)
        self.token = json.loads(self.meshctl("token", "create", "--network", NETWORK, "--uses", "3",
                                             "--expires", "1h", "-o", "json"))["token"]
        first = [h for h in AGENTS if not (self.opts.cold and h == "c")]
        for h in first:
            self.start_agent(h)
        self.wait_for(f"{len(first)} nodes online", 30, lambda: self.online() == len(first))
        listed = [] if self.opts.unlisted else ["--standby", "vm-c", "--allow", "vm-a,vm-c"]
        if self.opts.cold and not self.opts.unlisted:
            # vm-c has not joined yet: it can be listed only once it has.
            listed = ["--allow", "vm-a"]
        self.meshctl("workload", "create", WORKLOAD, "--network", NETWORK, "--address", WORKLOAD_IP,
                     *listed)
        self.meshctl("workload", "attach", WORKLOAD, "--node", "vm-a")
        for h in ("a", "c"):
            self.echo[h] = self.spawn(h, [self.bin("meshlink-probe"), "echo", "--bind", f"0.0.0.0:{PORT}",
                                          "--name", f"vm-{h}"], f"echo-{h}.log")
        self.mover = self.spawn_piped("c0", ["python3", "-c", MOVER, f"http://127.0.0.1:{ADMIN_PORT}",
                                             os.path.join(self.state, "admin.token"), WORKLOAD], "mover.log")

    def start_agent(self, h):
        iface = f"{self.prefix}{h}"
        self.interfaces.append(iface)
        path = token_file(self.tmp, f"vm-{h}", self.token)
        self.agents[h] = self.spawn(h, [self.bin("meshlink-agent"), "up", "--token-file", path,
                                        "--name", f"vm-{h}", "--label", f"provider={h}",
                                        "--state-dir", os.path.join(self.tmp, f"state-{h}"),
                                        "--interface", iface], f"agent-{h}.log")

    def online(self):
        out = self.meshctl("node", "list", "-o", "json", check=False)
        try:
            return sum(1 for n in json.loads(out) if n.get("online"))
        except (json.JSONDecodeError, TypeError):
            return 0

    def cleanup(self):
        super().cleanup()
        if self.pg:
            self.pg.close()

    def agent_status(self, h):
        """`meshlink-agent status -o json` of agent `h`, parsed; raises RuntimeError or
        json.JSONDecodeError when it does not answer."""
        return json.loads(run(["ip", "netns", "exec", self.ns_name(h), self.bin("meshlink-agent"), "status",
                               "--interface", f"{self.prefix}{h}", "-o", "json"]))

    def agent_coordinator(self, h):
        """The coordinator agent `h` is connected to (`host:port`), or None."""
        try:
            st = self.agent_status(h)
        except (RuntimeError, json.JSONDecodeError):
            return None
        c = st.get("control") or {}
        return c.get("coordinator") if c.get("connected") else None

    def coordinator_kills(self):
        """The coordinator vm-a is connected to SIGKILLed under the probe, `--kills` times."""
        results = []
        by_addr = {a: n for n, a in self.addr.items()}
        for k in range(self.opts.kills):
            if self.holder() != "vm-a":
                self.meshctl("workload", "move", WORKLOAD, "--to", "vm-a")
            time.sleep(2.0)
            proc, out = self.probe(8, f"kill-{k}")
            time.sleep(1.0)
            victim_addr = self.agent_coordinator("a")
            victim = by_addr.get(victim_addr)
            if victim is None:
                raise RuntimeError(f"vm-a is connected to {victim_addr!r}, not one of {self.addr}")
            self.admin_host = next(n for n in self.names if n != victim)
            if victim == "c0":
                self.mover.kill()
                self.untrack(self.mover)
            t_kill = time.time_ns()
            self.coords[victim].kill()
            reconnect = {}
            deadline = time.monotonic() + 20
            while len(reconnect) < len(AGENTS) and time.monotonic() < deadline:
                for h in AGENTS:
                    if h not in reconnect:
                        c = self.agent_coordinator(h)
                        if c is not None and c != victim_addr:
                            reconnect[h] = (time.time_ns() - t_kill) / 1e6
                time.sleep(0.005)
            self.coords[victim].wait()
            self.untrack(self.coords[victim])
            proc.wait(timeout=40)
            self.untrack(proc)
            recs = self.records(out)
            after, lost, longest = silence_after(recs, t_kill)
            results.append({"victim": victim, "lost": lost, "probes": len(after),
                            "longest_silence_ms": longest / 1e6,
                            "reconnect_ms": {f"vm-{h}": reconnect.get(h) for h in AGENTS}})
            log(f"kill {k + 1}: {results[-1]}")
            self.start_coordinator(f"coordinator-{victim}-{k + 1}.log", victim)
            if victim == "c0":
                self.mover = self.spawn_piped("c0", ["python3", "-c", MOVER, f"http://127.0.0.1:{ADMIN_PORT}",
                                                     os.path.join(self.state, "admin.token"), WORKLOAD],
                                              f"mover-kill-{k + 1}.log")
            self.admin_host = "c0"
        return results

    def meshctl(self, *args, check=True):
        return run(["ip", "netns", "exec", self.ns_name(self.admin_host), self.bin("meshctl"),
                    "--coordinator", f"http://127.0.0.1:{ADMIN_PORT}",
                    "--admin-token-file", os.path.join(self.state, "admin.token"), *args], check=check)

    def move(self, to):
        self.mover.stdin.write(f"move vm-{to}\n")
        self.mover.stdin.flush()
        line = self.mover.stdout.readline()
        if not line:
            raise RuntimeError(f"the move client stopped:\n{tail(self.mover.log_path)}")
        return json.loads(line)

    def holder(self):
        w = json.loads(self.meshctl("workload", "show", WORKLOAD, "-o", "json"))
        return (w.get("holder") or {}).get("name")

    def probe(self, seconds, name):
        out = os.path.join(self.tmp, f"{name}.jsonl")
        ready = os.path.join(self.tmp, f"{name}.ready")
        proc = self.spawn("b", [self.bin("meshlink-probe"), "send", "--to", f"{WORKLOAD_IP}:{PORT}",
                                "--interval-us", "1000", "--duration-s", str(seconds), "--out", out,
                                "--ready-file", ready], f"{name}.log")
        self.wait_for("the probe to start", 10, lambda: os.path.exists(ready), proc)
        return proc, out

    @staticmethod
    def records(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def moves(self):
        n, gap = self.opts.moves, self.opts.gap
        # A cold run first waits for vm-c to join (seconds at most).
        proc, out = self.probe(int(2 + n * gap + 2 + (8 if self.opts.cold else 0)), "moves")
        time.sleep(1.0)
        done, target = [], "c"
        if self.opts.cold:
            self.start_agent("c")
            self.wait_for("vm-c online", 30, lambda: self.online() == 3)
        for _ in range(n):
            warm = self.handshaken_peers(target)
            r = self.move(target)
            r["to"], r["from"] = f"vm-{target}", f"vm-{'a' if target == 'c' else 'c'}"
            r["warm_peers"] = warm
            done.append(r)
            target = "a" if target == "c" else "c"
            time.sleep(gap)
        proc.wait(timeout=n * gap + 30)
        self.untrack(proc)
        recs = self.records(out)
        end = max(r["sent"] for r in recs) - 600_000_000  # the prober's grace before its end
        before = [r for r in recs if r["sent"] < done[0]["t_req"]]
        results = []
        for i, m in enumerate(done):
            t0 = m["t_req"]
            t1 = done[i + 1]["t_req"] if i + 1 < len(done) else end
            window = [r for r in recs if t0 <= r["sent"] < t1]
            first = [r["recv"] for r in window if r["by"] == m["to"] and r["recv"] is not None]
            results.append({
                "to": m["to"],
                "to_new_holder_ms": (min(first) - t0) / 1e6 if first else None,
                "lost": sum(1 for r in window if r["recv"] is None),
                # The slowest answer around the switch: what waiting for the confirmation cost.
                "max_rtt_ms": max(((r["recv"] - r["sent"]) / 1e6 for r in window if r["recv"] is not None),
                                  default=None),
                "answered_by_old": sum(1 for r in window if r["by"] == m["from"]),
                "probes": len(window),
                "request_ms": (m["t_resp"] - t0) / 1e6,
                "prepared_ms": m["answer"].get("prepared_ms"),
                "commit_ms": m["answer"].get("took_ms"),
                "generation": m["answer"].get("generation"),
                "cold": m["warm_peers"] == 0,
                "listed": not self.opts.unlisted,
            })
        return {"moves": results, "lost_before_first_move": sum(1 for r in before if r["recv"] is None),
                "probes_before_first_move": len(before), "agent_drops": self.drops()}

    def handshaken_peers(self, h):
        """How many of agent `h`'s peers it has completed a handshake with (-1: no status)."""
        try:
            st = self.agent_status(h)
        except (RuntimeError, json.JSONDecodeError):
            return -1
        return sum(1 for p in st.get("peers", []) if p.get("latest_handshake_secs_ago") is not None)

    def drops(self):
        """Every agent's drop counters (device and per peer, summed), for the record."""
        out = {}
        for h in AGENTS:
            try:
                st = self.agent_status(h)
            except (RuntimeError, json.JSONDecodeError) as e:
                out[f"vm-{h}"] = str(e)
                continue
            peers = {}
            for p in st.get("peers", []):
                for k, v in (p.get("drops") or {}).items():
                    peers[k] = peers.get(k, 0) + v
            out[f"vm-{h}"] = {"device": st.get("drops"), "peers": peers, "handover": st.get("handover")}
        return out

    def failovers(self):
        results = []
        for k in range(self.opts.failovers):
            if self.holder() != "vm-a":
                self.move("a")
            time.sleep(2.0)
            proc, out = self.probe(8, f"failover-{k}")
            time.sleep(1.0)
            t_kill = time.time_ns()
            self.agents["a"].kill()
            self.agents["a"].wait()
            self.untrack(self.agents["a"])
            proc.wait(timeout=30)
            self.untrack(proc)
            recs = self.records(out)
            after = [r["recv"] for r in recs if r["sent"] >= t_kill and r["by"] == "vm-c" and r["recv"]]
            results.append({"failover_ms": (min(after) - t_kill) / 1e6 if after else None,
                            "lost": sum(1 for r in recs if r["sent"] >= t_kill and r["recv"] is None)})
            log(f"failover {k + 1}: {results[-1]}")
            self.start_agent("a")
            self.wait_for("vm-a back online", 30, lambda: self.online() == 3)
        return results

    def restarts(self):
        """The coordinator SIGKILLed (with `--orderly`, SIGTERMed and waited for) and started
        again `--outage` seconds after it ended, `--restarts` times, with the workload held by
        vm-a and probed once per millisecond throughout."""
        results = []
        for k in range(self.opts.restarts):
            if self.holder() != "vm-a":
                self.move("a")
            time.sleep(2.0)
            seconds = int(self.opts.outage + 8)
            proc, out = self.probe(seconds, f"restart-{k}")
            time.sleep(1.0)
            self.mover.kill()
            self.untrack(self.mover)
            t_kill = time.time_ns()
            if self.opts.orderly:
                self.coord.send_signal(signal.SIGTERM)
            else:
                self.coord.kill()
            self.coord.wait(timeout=30)
            t_gone = time.time_ns()
            self.untrack(self.coord)
            time.sleep(self.opts.outage)
            t_start = time.time_ns()
            self.start_coordinator(f"coordinator-{k + 1}.log")
            t_ready = time.time_ns()
            self.mover = self.spawn_piped("c0", ["python3", "-c", MOVER, f"http://127.0.0.1:{ADMIN_PORT}",
                                                 os.path.join(self.state, "admin.token"), WORKLOAD],
                                          f"mover-{k + 1}.log")
            self.wait_for("every agent back online", 60, lambda: self.online() == 3)
            t_online = time.time_ns()
            proc.wait(timeout=seconds + 30)
            self.untrack(proc)
            recs = self.records(out)
            after, lost, longest = silence_after(recs, t_kill)
            unanswered_tail = any(r["recv"] is None for r in after[-50:])
            results.append({
                "outage_s": self.opts.outage,
                "orderly": self.opts.orderly,
                "signal_to_exit_ms": (t_gone - t_kill) / 1e6,
                "exit_to_ready_ms": (t_ready - t_gone) / 1e6,
                "lost": lost,
                "probes": len(after),
                "longest_silence_ms": longest / 1e6,
                "silent_at_end": unanswered_tail,
                "restart_ready_ms": (t_ready - t_start) / 1e6,
                "all_online_after_start_ms": (t_online - t_start) / 1e6,
                "answered_by": sorted({r["by"] for r in after if r["by"]}),
            })
            log(f"restart {k + 1}: {results[-1]}")
        return results


def silence_after(recs, t0):
    """The probes sent from `t0` on (by sequence), how many went unanswered, and the longest
    silence in ns: the time between the last answered probe before a run of unanswered ones and
    the first answered one after it (probe send times)."""
    after = sorted((r for r in recs if r["sent"] >= t0), key=lambda r: r["seq"])
    longest, last_ok, lost = 0, None, 0
    for r in after:
        if r["recv"] is None:
            lost += 1
            continue
        if last_ok is not None:
            longest = max(longest, r["sent"] - last_ok)
        last_ok = r["sent"]
    return after, lost, longest


def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def fmt(x, unit=" ms"):
    return "n/a" if x is None else f"{x:.1f}{unit}"


def report(res, opts):
    if res["moves"]:
        report_moves(res)
    report_failovers(res["failovers"])
    report_restarts(res["restarts"], opts)
    report_kills(res.get("kills"), opts)


def report_kills(ks, opts):
    if not ks:
        return
    lost = [k["lost"] for k in ks]
    sil = [k["longest_silence_ms"] for k in ks]
    holder = [k["reconnect_ms"]["vm-a"] for k in ks if k["reconnect_ms"]["vm-a"] is not None]
    others = [v for k in ks for h, v in k["reconnect_ms"].items() if h != "vm-a" and v is not None]
    missing = sum(1 for k in ks for v in k["reconnect_ms"].values() if v is None)
    print(f"\n## {opts.ha} coordinators on PostgreSQL: the holder's coordinator SIGKILLed, {len(ks)} times\n")
    print("| figure | median | p99 | max | bar |")
    print("|---|---|---|---|---|")
    print(f"| probes lost (1/ms) | {statistics.median(lost):.0f} | {pct(lost, 99)} | {max(lost)} | 0 |")
    print(f"| longest silence of the workload address | {fmt(statistics.median(sil))} | {fmt(pct(sil, 99))} "
          f"| {fmt(max(sil))} | |")
    print(f"| holder (vm-a) on another coordinator, from the kill | {fmt(statistics.median(holder) if holder else None)} "
          f"| {fmt(pct(holder, 99))} | {fmt(max(holder) if holder else None)} | p99 < 1000 ms |")
    print(f"| other agents on another coordinator, from the kill | {fmt(statistics.median(others) if others else None)} "
          f"| {fmt(pct(others, 99))} | {fmt(max(others) if others else None)} | p99 < 1000 ms |")
    print(f"\nAgents that did not reconnect within 20 s: {missing}. Victims: "
          f"{json.dumps([k['victim'] for k in ks])}.")


def merge_moves(runs):
    """The move figures of several fresh meshes as one (each move keeps its mesh's index)."""
    if not runs:
        return None
    moves = [dict(m, mesh=i) for i, r in enumerate(runs) for m in r["moves"]]
    return {"moves": moves, "meshes": len(runs),
            "lost_before_first_move": sum(r["lost_before_first_move"] for r in runs),
            "probes_before_first_move": sum(r["probes_before_first_move"] for r in runs),
            "agent_drops": [r["agent_drops"] for r in runs]}


def report_moves(res):
    mv = res["moves"]["moves"]
    meshes = res["moves"].get("meshes", 1)
    lat = [m["to_new_holder_ms"] for m in mv if m["to_new_holder_ms"] is not None]
    lost = [m["lost"] for m in mv]
    missing = len(mv) - len(lat)
    print(f"\n## Workload moves: {len(mv)} planned moves vm-a <-> vm-c in {meshes} fresh mesh(es), "
          f"probe 1/ms from vm-b\n")
    print("| figure | median | p99 | max | bar |")
    print("|---|---|---|---|---|")
    print(f"| move request -> first probe answered by the new holder | {fmt(statistics.median(lat) if lat else None)} "
          f"| {fmt(pct(lat, 99))} | {fmt(max(lat) if lat else None)} | median < 50 ms, p99 < 200 ms |")
    for key, label in (("max_rtt_ms", "slowest probe round trip of the move"),
                       ("request_ms", "admin API request -> answer"), ("prepared_ms", "destination ready (tunnels)"),
                       ("commit_ms", "coordinator: request -> change queued")):
        v = [m[key] for m in mv if m[key] is not None]
        print(f"| {label} | {fmt(statistics.median(v) if v else None)} | {fmt(pct(v, 99))} | {fmt(max(v) if v else None)} | |")
    print(f"\nProbes lost per planned move: total {sum(lost)} over {len(mv)} moves, max {max(lost) if lost else 0} "
          f"(bar: 0); moves never answered by the new holder: {missing}. Before the first move: "
          f"{res['moves']['lost_before_first_move']} lost of {res['moves']['probes_before_first_move']}.")
    if meshes > 1:
        per = [sum(m["lost"] for m in mv if m.get("mesh") == i) for i in range(meshes)]
        print(f"\nProbes lost per mesh: {per}.")
    cold = [m for m in mv if m.get("cold")]
    if cold:
        cl = [m["to_new_holder_ms"] for m in cold if m["to_new_holder_ms"] is not None]
        print(f"\nCold moves (the destination had no handshake with any peer yet): {len(cold)}, "
              f"{sum(m['lost'] for m in cold)} probes lost (max {max(m['lost'] for m in cold)}); request -> "
              f"first answer by the new holder median {fmt(statistics.median(cl) if cl else None)}, "
              f"p99 {fmt(pct(cl, 99))}, max {fmt(max(cl) if cl else None)}.")
    unlisted = [m for m in mv if not m.get("listed", True)]
    if unlisted:
        print(f"\nMoves to a node the workload does not list (no standby, no allowed holder): {len(unlisted)}.")
    print(f"\nPer move: {json.dumps([(m['to'], m['to_new_holder_ms'], m['lost']) for m in mv])}")
    print(f"\nAgent drop counters after the moves (per mesh): {json.dumps(res['moves']['agent_drops'])}")


def report_failovers(fo):
    if not fo:
        return
    t = [f["failover_ms"] for f in fo if f["failover_ms"] is not None]
    print(f"\n## Failover: holder's agent killed, {len(fo)} times\n")
    print("| figure | median | max | bar |")
    print("|---|---|---|---|")
    print(f"| kill -> first probe answered by the standby | {fmt(statistics.median(t) if t else None)} "
          f"| {fmt(max(t) if t else None)} | < 2000 ms |")
    print(f"\nFailovers that never completed: {len(fo) - len(t)}.")


def report_restarts(rs, opts):
    if not rs:
        return
    sil = [r["longest_silence_ms"] for r in rs]
    lost = [r["lost"] for r in rs]
    how = "stopped with SIGTERM" if opts.orderly else "SIGKILLed"
    print(f"\n## Coordinator {how}, started again {opts.outage:g} s after it ended, {len(rs)} times; holder under probe\n")
    print("| figure | median | max | bar |")
    print("|---|---|---|---|")
    print(f"| probes lost (1/ms) | {statistics.median(lost):.0f} | {max(lost)} | 0 |")
    print(f"| longest silence of the workload address | {fmt(statistics.median(sil))} | {fmt(max(sil))} | 0 |")
    v = [r["signal_to_exit_ms"] for r in rs]
    print(f"| signal -> coordinator ended | {fmt(statistics.median(v))} | {fmt(max(v))} | |")
    v = [r["exit_to_ready_ms"] for r in rs]
    print(f"| coordinator ended -> restarted coordinator ready (the outage) | {fmt(statistics.median(v))} | {fmt(max(v))} | |")
    v = [r["all_online_after_start_ms"] for r in rs]
    print(f"| coordinator start -> every agent online (meshctl polled) | {fmt(statistics.median(v))} | {fmt(max(v))} | |")
    print(f"\nRounds still silent when the probe ended: {sum(1 for r in rs if r['silent_at_end'])}.")
    print(f"\nPer round: {json.dumps([(r['lost'], r['longest_silence_ms'], r['answered_by']) for r in rs])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", type=int, default=20, help="planned moves (in each mesh)")
    ap.add_argument("--meshes", type=int, default=1, help="fresh meshes to run the moves in, one after the other")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between moves")
    ap.add_argument("--cold", action="store_true",
                    help="vm-c joins under the probe and the first move goes to it at once (see above)")
    ap.add_argument("--unlisted", action="store_true",
                    help="the workload lists no standby and no allowed holder: every move goes to an unlisted node")
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=0,
                    help="coordinator SIGKILL + restart rounds with the workload under probe")
    ap.add_argument("--outage", type=float, default=1.0, help="seconds the coordinator stays down per restart")
    ap.add_argument("--orderly", action="store_true",
                    help="restarts stop the coordinator with SIGTERM (an upgrade) instead of SIGKILL")
    ap.add_argument("--ha", type=int, default=0, choices=[0, 2, 3],
                    help="coordinators sharing a private PostgreSQL (0: one on SQLite)")
    ap.add_argument("--kills", type=int, default=0,
                    help="with --ha: rounds of SIGKILL of the holder's coordinator under the probe")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release"))
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--keep-logs", action="store_true")
    opts = ap.parse_args()
    if opts.unlisted and opts.failovers:
        sys.exit("wlmove: --unlisted leaves the workload without a standby: use --failovers 0")
    if opts.kills and opts.ha < 2:
        sys.exit("wlmove: --kills needs --ha 2 or 3")
    if opts.restarts and opts.ha:
        sys.exit("wlmove: --restarts is for the lone coordinator (use --kills with --ha)")
    if os.geteuid() != 0:
        sys.exit("wlmove: needs root (network namespaces and TUN devices)")
    if not opts.no_build:
        log("building release binaries ...")
        run(["cargo", "build", "--release", "-q", "-p", "meshlink-agent", "-p", "meshlink-coordinator",
             "-p", "meshctl", "-p", "meshlink-probe"], cwd=REPO, capture=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    runs, res = [], None
    meshes = max(1, opts.meshes)
    for i in range(meshes):
        bench = MoveBench(opts)
        try:
            bench.setup()
            bench.start()
            if opts.moves:
                runs.append(bench.moves())
                lost = sum(m["lost"] for m in runs[-1]["moves"])
                log(f"mesh {i + 1} of {meshes}: {opts.moves} moves, {lost} probes lost")
            if i == meshes - 1:
                res = {"failovers": bench.failovers(), "restarts": bench.restarts(),
                       "kills": bench.coordinator_kills(), "machine": bench.environment()}
        except Exception:
            log(f"logs: {bench.tmp}")
            opts.keep_logs = True
            raise
        finally:
            bench.cleanup()
    res["moves"] = merge_moves(runs)
    report(res, opts)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
