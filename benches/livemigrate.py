#!/usr/bin/env python3
"""Live migrations under load: what a client of a workload notices when its server moves to
another VM with its TCP connections (`meshctl workload migrate`).

One command, as root:

    python3 benches/livemigrate.py                   # builds the release binaries; 20 moves
    python3 benches/livemigrate.py --moves 40 --json livemigrate.json
    python3 benches/livemigrate.py --no-build --bin-dir target/debug --moves 2   # harness check

Setup: three simulated providers (bed.py: a router namespace with one bridge each, A on
198.18.1.0/24, B on 198.18.2.0/24, C on 198.18.3.0/24). The coordinator runs on A
(198.18.1.10); vm-a (label provider=aws) on A, vm-b (gcp) on B and vm-c (azure) on C run
`meshlink-agent up --token-file`. The workload `chat` (100.64.50.10) lists vm-c as standby
and vm-a, vm-c as allowed holders, and is attached to vm-a.

(a) Chat. `meshlink-chat server --listen 100.64.50.10:7070 --migrate chat` runs on vm-a and
vm-c (handovers on port 7071); on vm-b the clients alice and bob join, and alice says a line
(a sequence number) every 10 ms. The workload is then migrated `--moves` times between vm-a
and vm-c, one move every `--gap` seconds, each through the coordinator's admin API (POST
/v1/workloads/chat/move with `live`, what `meshctl workload migrate` sends) by a small client
in the coordinator's namespace. Per move:
  - the coordinator's answer: `handed_over_ms` (the application's handover, from the ask to
    the answer) and `took_ms` (request to the change queued), and the request's round trip;
  - from the servers' logs: the source's freeze (`migrate: froze N connections in X ms`:
    the pause of the room and the freeze), its handover (`migrate: handed over ... in X ms`:
    connect to the destination's ready) and the destination's go-live (`migrate: arrived ...
    resumed N connections ... in X ms`);
  - what bob sees: the longest gap between two lines he receives from 0.5 s before the
    request to 1 s after its answer (alice's 10 ms is the floor), and the slowest line (sent
    by alice to received by bob) in that window.
Over the run: alice's lines bob never got, and that both clients kept their one connection
(one `* connected to` line each, no `* disconnected`).

(b) Bulk. The chat servers and clients stop; `meshlink-xfer serve --listen
100.64.50.10:7000 --bytes N --migrate chat` runs on vm-a and vm-c, and on vm-b `meshlink-xfer
fetch` reads N bytes (`--bulk-mib`, 64 by default) at `--bulk-rate-mbit` (100 by default; 0:
as fast as it goes), twice in the same run: once without a migration (the baseline), once
with one in the middle (at half the baseline's duration). For each: whether the SHA-256 is
the one `meshlink-xfer expect` gives, the longest stall (the longest time between two reads
that brought data), and the throughput per 100 ms bin: the lowest bin against the median bin
(the dip; the first and last bins are left out, they hold the start and the end), and the
migrated run's median against the baseline's. The migration's own figures are recorded as in
(a).

The report is a markdown table per part; `--json` keeps every figure. Only python3's standard
library is used; everything made is removed on exit (names carry `mll<pid>`), also on Ctrl-C.
The figures are only comparable on an otherwise idle machine.
"""

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bed import UAPI_DIR, Bed, log, publish, run, tail, token_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK, NETWORK_CIDR = "bench", "100.64.0.0/16"
WORKLOAD, WORKLOAD_IP = "chat", "100.64.50.10"
CHAT_PORT, BULK_PORT, HANDOVER_PORT = 7070, 7000, 7071
QUIC_PORT, ADMIN_PORT = 7443, 7444
# (host, provider, last octet); the coordinator is "c0".
HOSTS = [("c0", 1, 10), ("a", 1, 11), ("b", 2, 10), ("c", 3, 10)]
LABELS = {"a": "aws", "b": "gcp", "c": "azure"}
AGENTS = ["a", "b", "c"]
SEED = 7

# Runs inside the coordinator's namespace: reads one node name per line, asks for a live
# migration there and answers one JSON line each: the request's CLOCK_REALTIME stamps (ns),
# the HTTP status and the admin API's answer (its error body on a refusal).
MOVER = r"""
import json, sys, time, urllib.error, urllib.request
base, token, name = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
for line in sys.stdin:
    body = json.dumps({"node": line.strip(), "live": True}).encode()
    req = urllib.request.Request(f"{base}/v1/workloads/{name}/move", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    t_req = time.time_ns()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, answer = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status = e.code
        try:
            answer = json.loads(e.read())
        except ValueError:
            answer = {"error": str(e)}
    t_resp = time.time_ns()
    print(json.dumps({"t_req": t_req, "t_resp": t_resp, "status": status, "answer": answer}),
          flush=True)
"""

# A log line of the servers: RFC 3339 UTC time, level, message.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)\s+\w+\s+(.*)$")
FROZE = re.compile(r"migrate: froze (\d+) connections in ([\d.]+) ms")
HANDED = re.compile(r"migrate: handed over (\d+) connections \((\d+) bytes\) to (\S+) in ([\d.]+) ms")
ARRIVED = re.compile(r"migrate: arrived \S+ at generation \d+: resumed (\d+) connections from (\S+) in ([\d.]+) ms")
FAILED = re.compile(r"migrate: handover to (\S+) failed: (.*)")
DONE = re.compile(r"done bytes=(\d+) sha256=([0-9a-f]+) secs=([\d.]+) longest_stall_ms=([\d.]+) bins=(.*)$")


def stamp_ns(text):
    """RFC 3339 UTC (`...Z`, microseconds) as ns since the epoch."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(t.timestamp() * 1e9)


def log_events(path):
    """The `migrate: ` lines of a server's log as (ns, message)."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LOG_LINE.match(line.strip())
                if m and "migrate: " in m.group(2):
                    out.append((stamp_ns(m.group(1)), m.group(2)))
    except OSError:
        pass
    return out


def first(events, pattern, t0, t1):
    """The first match of `pattern` among `events` stamped in [t0, t1)."""
    for t, msg in events:
        if t0 <= t < t1:
            m = pattern.search(msg)
            if m:
                return m
    return None


def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def fmt(x, unit=" ms"):
    return "n/a" if x is None else f"{x:.1f}{unit}"


class Lines(threading.Thread):
    """Reads a piped process's stdout, stamping each line with CLOCK_REALTIME (ns)."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc = proc
        self.lines = []  # (ns, text)
        self.lock = threading.Lock()
        self.start()

    def run(self):
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append((time.time_ns(), line.rstrip("\n")))

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def wait_for(self, text, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for _, line in self.snapshot()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"no line with {text!r} within {timeout}s; saw {self.snapshot()[-10:]}\n"
                           f"{tail(self.proc.log_path)}")


class Talker(threading.Thread):
    """Writes a sequence number to a client's stdin every `interval` seconds until stopped;
    keeps each one's send time (CLOCK_REALTIME, ns)."""

    def __init__(self, proc, interval):
        super().__init__(daemon=True)
        self.proc, self.interval = proc, interval
        self.sent = {}
        self.stopping = threading.Event()
        self.start()

    def run(self):
        seq, at = 0, time.monotonic()
        while not self.stopping.is_set():
            self.sent[seq] = time.time_ns()
            try:
                self.proc.stdin.write(f"{seq}\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                return
            seq += 1
            at += self.interval
            time.sleep(max(0.0, at - time.monotonic()))

    def stop(self):
        self.stopping.set()
        self.join()


class LiveBench(Bed):
    def __init__(self, opts):
        super().__init__(opts, prefix=f"mll{os.getpid()}", providers=3, hosts=HOSTS)
        self.state = os.path.join(self.tmp, "coordinator")
        self.agents = {}
        self.holder = "a"

    # The mesh.

    def start(self):
        args = [self.bin("meshlink-coordinator"), "serve", "--state-dir", self.state,
                "--listen", f"0.0.0.0:{QUIC_PORT}", "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                "--advertise", f"198.18.1.10:{QUIC_PORT}"]
        coord = self.spawn("c0", args, "coordinator.log")
        self.wait_for("the coordinator's fingerprint line", 20,
                      lambda: "coordinator fingerprint:" in tail(coord.log_path, 200), coord)
        self.meshctl("network", "create", NETWORK, "--cidr", NETWORK_CIDR)
        token = json.loads(self.meshctl("token", "create", "--network", NETWORK, "--uses", "3",
                                        "--expires", "1h", "-o", "json"))["token"]
        for h in AGENTS:
            iface = self.iface(h)
            self.interfaces.append(iface)
            self.agents[h] = self.spawn(h, [self.bin("meshlink-agent"), "up", "--token-file",
                                            token_file(self.tmp, f"vm-{h}", token), "--name", f"vm-{h}",
                                            "--label", f"provider={LABELS[h]}",
                                            "--state-dir", os.path.join(self.tmp, f"state-{h}"),
                                            "--interface", iface], f"agent-{h}.log")
        self.wait_for("3 nodes online", 30, lambda: self.online() == 3)
        self.meshctl("workload", "create", WORKLOAD, "--network", NETWORK, "--address", WORKLOAD_IP,
                     "--standby", "vm-c", "--allow", "vm-a,vm-c")
        self.meshctl("workload", "attach", WORKLOAD, "--node", "vm-a")
        self.wait_for("the workload address on vm-a", 20,
                      lambda: WORKLOAD_IP in self.ip("a", "-4", "addr", "show", "dev", self.iface("a")))
        self.mover = self.spawn_piped("c0", ["python3", "-c", MOVER, f"http://127.0.0.1:{ADMIN_PORT}",
                                             os.path.join(self.state, "admin.token"), WORKLOAD], "mover.log")

    def iface(self, h):
        return f"{self.prefix}{h}"

    def agent_socket(self, h):
        return os.path.join(UAPI_DIR, f"{self.iface(h)}.sock")

    def meshctl(self, *args, check=True):
        return run(["ip", "netns", "exec", self.ns_name("c0"), self.bin("meshctl"),
                    "--coordinator", f"http://127.0.0.1:{ADMIN_PORT}",
                    "--admin-token-file", os.path.join(self.state, "admin.token"), *args], check=check)

    def online(self):
        out = self.meshctl("node", "list", "-o", "json", check=False)
        try:
            return sum(1 for n in json.loads(out) if n.get("online"))
        except (json.JSONDecodeError, TypeError):
            return 0

    def migrate(self, to):
        """A live migration to vm-`to` through the admin API; the holder follows its answer."""
        self.mover.stdin.write(f"vm-{to}\n")
        self.mover.stdin.flush()
        line = self.mover.stdout.readline()
        if not line:
            raise RuntimeError(f"the move client stopped:\n{tail(self.mover.log_path)}")
        r = json.loads(line)
        r["from"], r["to"] = f"vm-{self.holder}", f"vm-{to}"
        r["ok"] = r["status"] == 200 and bool(r["answer"].get("changed"))
        if r["ok"]:
            self.holder = to
        return r

    def move_figures(self, m, servers, t_end):
        """A move's figures: the coordinator's answer, and the servers' log lines from its
        request to `t_end` (`servers`: host -> log path)."""
        src, dst = m["from"][3:], m["to"][3:]
        t0 = m["t_req"]
        src_log, dst_log = log_events(servers[src]), log_events(servers[dst])
        froze = first(src_log, FROZE, t0, t_end)
        handed = first(src_log, HANDED, t0, t_end)
        failed = first(src_log, FAILED, t0, t_end)
        arrived = first(dst_log, ARRIVED, t0, t_end)
        answer = m["answer"]
        return {
            "from": m["from"], "to": m["to"], "ok": m["ok"], "status": m["status"],
            "error": None if m["ok"] else (answer.get("error") or answer.get("message") or answer),
            "request_ms": (m["t_resp"] - t0) / 1e6,
            "handed_over_ms": answer.get("handed_over_ms"),
            "took_ms": answer.get("took_ms"),
            "prepared_ms": answer.get("prepared_ms"),
            "generation": answer.get("generation"),
            "connections": int(froze.group(1)) if froze else None,
            "freeze_ms": float(froze.group(2)) if froze else None,
            "handover_ms": float(handed.group(4)) if handed else None,
            "handover_bytes": int(handed.group(2)) if handed else None,
            "go_live_ms": float(arrived.group(3)) if arrived else None,
            "resumed": int(arrived.group(1)) if arrived else None,
            "source_error": failed.group(2) if failed else None,
        }

    # (a) The chat.

    def chat(self):
        servers = {}
        procs = []
        for h in ("a", "c"):
            p = self.spawn(h, [self.bin("meshlink-chat"), "server", "--listen", f"{WORKLOAD_IP}:{CHAT_PORT}",
                               "--name", f"vm-{h}", "--migrate", WORKLOAD, "--agent-socket",
                               self.agent_socket(h), "--handover-port", str(HANDOVER_PORT)],
                           f"chat-server-{h}.log")
            servers[h] = p.log_path
            procs.append(p)
        for h, p in zip(("a", "c"), procs):
            self.wait_for(f"the chat server on vm-{h} registered", 20,
                          lambda p=p: "migrate: holder of" in tail(p.log_path, 50), p)
        clients = {}
        for nick in ("alice", "bob"):
            c = self.spawn_piped("b", [self.bin("meshlink-chat"), "client", "--server",
                                       f"{WORKLOAD_IP}:{CHAT_PORT}", "--nick", nick], f"chat-{nick}.log")
            clients[nick] = (c, Lines(c))
            clients[nick][1].wait_for("* welcome to the room on vm-a", 20)
        clients["alice"][1].wait_for("* bob joined", 10)
        alice, bob = clients["alice"][0], clients["bob"][1]
        talker = Talker(alice, 0.010)
        bob.wait_for("alice: 0", 10)
        time.sleep(1.0)
        moves = []
        for i in range(self.opts.moves):
            to = "c" if self.holder == "a" else "a"
            m = self.migrate(to)
            moves.append(m)
            log(f"chat move {i + 1}: {m['from']} -> {m['to']}: {m['status']} "
                f"handed over in {m['answer'].get('handed_over_ms')} ms")
            time.sleep(self.opts.gap)
        talker.stop()
        time.sleep(1.0)
        received = bob.snapshot()
        results = []
        for i, m in enumerate(moves):
            t_end = moves[i + 1]["t_req"] if i + 1 < len(moves) else time.time_ns()
            r = self.move_figures(m, servers, t_end)
            r.update(self.bob_around(m, received, talker.sent))
            results.append(r)
        got = {int(text.split(": ", 1)[1]) for _, text in received
               if text.startswith("alice: ") and text.split(": ", 1)[1].isdigit()}
        logs = {}
        for nick, (c, lines) in clients.items():
            texts = [t for _, t in lines.snapshot()]
            logs[nick] = {"connected": sum(1 for t in texts if t.startswith("* connected to")),
                          "disconnected": sum(1 for t in texts if t.startswith("* disconnected"))}
        for nick, (c, _) in clients.items():
            c.stdin.close()
        for nick, (c, _) in clients.items():
            try:
                c.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.stop(c)
        for p in procs:
            self.stop(p)
        return {"moves": results, "lines_sent": len(talker.sent),
                "lines_lost": sorted(set(talker.sent) - got), "clients": logs}

    @staticmethod
    def bob_around(m, received, sent):
        """Bob's longest gap between lines, and the slowest line, around move `m`."""
        t0, t1 = m["t_req"] - 500_000_000, m["t_resp"] + 1_000_000_000
        times, slowest = [], None
        for t, text in received:
            if not (t0 <= t < t1 and text.startswith("alice: ")):
                continue
            times.append(t)
            seq = text.split(": ", 1)[1]
            if seq.isdigit() and int(seq) in sent:
                delay = (t - sent[int(seq)]) / 1e6
                slowest = delay if slowest is None else max(slowest, delay)
        gaps = [(b - a) / 1e6 for a, b in zip(times, times[1:])]
        return {"bob_longest_gap_ms": max(gaps) if gaps else None, "bob_slowest_line_ms": slowest,
                "bob_lines": len(times)}

    # (b) Bulk.

    def bulk(self):
        nbytes = self.opts.bulk_mib << 20
        expected = run([self.bin("meshlink-xfer"), "expect", "--bytes", str(nbytes), "--seed", str(SEED)])
        expected = expected.split("sha256=")[1].strip()
        servers, procs = {}, []
        for h in ("a", "c"):
            args = [self.bin("meshlink-xfer"), "serve", "--listen", f"{WORKLOAD_IP}:{BULK_PORT}",
                    "--bytes", str(nbytes), "--seed", str(SEED), "--migrate", WORKLOAD,
                    "--agent-socket", self.agent_socket(h), "--handover-port", str(HANDOVER_PORT)]
            if self.opts.bulk_rate_mbit > 0:
                args += ["--rate-mbit", str(self.opts.bulk_rate_mbit)]
            p = self.spawn(h, args, f"bulk-server-{h}.log")
            servers[h] = p.log_path
            procs.append(p)
        for h, p in zip(("a", "c"), procs):
            self.wait_for(f"the bulk server on vm-{h} registered", 20,
                          lambda p=p: "migrate: holder of" in tail(p.log_path, 50), p)
        baseline = self.fetch("bulk-baseline", expected)
        log(f"bulk baseline: {baseline['secs']:.2f} s, median {fmt(baseline['median_mbit'], ' Mbit/s')}")
        at = baseline["secs"] / 2
        fetcher, out = self.start_fetch("bulk-migrated")
        t_start = time.time_ns()
        time.sleep(at)
        to = "c" if self.holder == "a" else "a"
        m = self.migrate(to)
        log(f"bulk move {m['from']} -> {m['to']}: {m['status']} handed over in "
            f"{m['answer'].get('handed_over_ms')} ms")
        migrated = self.finish_fetch(fetcher, out, expected)
        migrated["migrated_after_s"] = (m["t_req"] - t_start) / 1e9
        move = self.move_figures(m, servers, time.time_ns())
        for p in procs:
            self.stop(p)
        if baseline["median_mbit"]:
            migrated["median_vs_baseline"] = (migrated["median_mbit"] or 0) / baseline["median_mbit"]
        return {"bytes": nbytes, "rate_mbit": self.opts.bulk_rate_mbit or None, "expected_sha256": expected,
                "baseline": baseline, "migrated": migrated, "move": move}

    def start_fetch(self, name):
        proc = self.spawn("b", [self.bin("meshlink-xfer"), "fetch", "--connect", f"{WORKLOAD_IP}:{BULK_PORT}",
                                "--bin-ms", "100", "--timeout", "300", "--idle", "30"], f"{name}.log")
        return proc, proc.log_path

    def finish_fetch(self, proc, out, expected):
        proc.wait(timeout=330)
        self.untrack(proc)
        with open(out, errors="replace") as f:
            done = [DONE.search(line) for line in f]
        done = [d for d in done if d]
        if proc.returncode != 0 or not done:
            raise RuntimeError(f"fetch failed ({proc.returncode}):\n{tail(out)}")
        d = done[-1]
        bins = [float(x) for x in d.group(5).split(",") if x]
        inner = bins[1:-1] if len(bins) > 2 else bins
        median = statistics.median(inner) if inner else None
        lowest = min(inner) if inner else None
        return {"bytes": int(d.group(1)), "sha256_ok": d.group(2) == expected, "secs": float(d.group(3)),
                "longest_stall_ms": float(d.group(4)), "median_mbit": median, "lowest_mbit": lowest,
                "dip": (lowest / median) if median else None, "bins_mbit": bins}

    def fetch(self, name, expected):
        proc, out = self.start_fetch(name)
        return self.finish_fetch(proc, out, expected)


def report(res, opts):
    lines = []
    chat = res.get("chat")
    if chat:
        mv = chat["moves"]
        ok = [m for m in mv if m["ok"]]
        lines.append(f"## Chat: {len(mv)} live migrations vm-a <-> vm-c, alice says a line every 10 ms, "
                     f"bob listens (vm-b)\n")
        lines.append("| figure | median | p99 | max |")
        lines.append("|---|---|---|---|")
        for key, label in (("handed_over_ms", "coordinator: handover asked -> answered (handed_over_ms)"),
                           ("took_ms", "coordinator: request -> committed (took_ms)"),
                           ("request_ms", "admin API request -> answer"),
                           ("freeze_ms", "source: pause + freeze"),
                           ("handover_ms", "source: connect -> destination ready"),
                           ("go_live_ms", "destination: arrived -> connections live"),
                           ("bob_longest_gap_ms", "bob: longest gap between lines around the move"),
                           ("bob_slowest_line_ms", "bob: slowest line (alice -> bob) around the move")):
            v = [m[key] for m in ok if m.get(key) is not None]
            lines.append(f"| {label} | {fmt(statistics.median(v) if v else None)} | {fmt(pct(v, 99))} "
                         f"| {fmt(max(v) if v else None)} |")
        failed = [(m["from"], m["to"], m["error"]) for m in mv if not m["ok"]]
        cl = chat["clients"]
        lines.append(f"\nMoves that did not happen: {len(failed)}{' ' + json.dumps(failed) if failed else ''}. "
                     f"Lines alice said that bob never got: {len(chat['lines_lost'])} of {chat['lines_sent']}. "
                     f"Connections: alice {cl['alice']['connected']} connected / {cl['alice']['disconnected']} "
                     f"disconnected, bob {cl['bob']['connected']} / {cl['bob']['disconnected']} "
                     f"(bar: 1 / 0 each).")
    bulk = res.get("bulk")
    if bulk:
        rate = f"{bulk['rate_mbit']:g} Mbit/s" if bulk["rate_mbit"] else "unpaced"
        lines.append(f"\n## Bulk: {bulk['bytes'] >> 20} MiB from the workload to vm-b ({rate}), "
                     f"once as is, once with a live migration half-way\n")
        lines.append("| run | sha256 | secs | longest stall | median bin | lowest bin | dip (lowest / median) |")
        lines.append("|---|---|---|---|---|---|---|")
        for name in ("baseline", "migrated"):
            r = bulk[name]
            dip = "n/a" if r["dip"] is None else f"{r['dip']:.2f}"
            lines.append(f"| {name} | {'ok' if r['sha256_ok'] else 'WRONG'} | {r['secs']:.2f} "
                         f"| {fmt(r['longest_stall_ms'])} | {fmt(r['median_mbit'], ' Mbit/s')} "
                         f"| {fmt(r['lowest_mbit'], ' Mbit/s')} | {dip} |")
        m = bulk["move"]
        vs = bulk["migrated"].get("median_vs_baseline")
        lines.append(f"\nThe migration ({m['from']} -> {m['to']}, {'done' if m['ok'] else 'FAILED: ' + str(m['error'])}, "
                     f"{bulk['migrated'].get('migrated_after_s', 0):.1f} s into the transfer): handed over in "
                     f"{fmt(m['handed_over_ms'])} (coordinator), committed in {fmt(m['took_ms'])}; "
                     f"source freeze {fmt(m['freeze_ms'])}, handover {fmt(m['handover_ms'])} "
                     f"({m['handover_bytes']} bytes shipped), destination live in {fmt(m['go_live_ms'])}. "
                     f"Median bin against the baseline's: {'n/a' if vs is None else f'{vs:.2f}'}.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", type=int, default=20, help="chat live migrations (0: none)")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between chat migrations")
    ap.add_argument("--bulk-mib", type=int, default=64, help="MiB per bulk transfer (0: no bulk part)")
    ap.add_argument("--bulk-rate-mbit", type=float, default=100.0,
                    help="the bulk server's pace in Mbit/s (0: as fast as the connection goes)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release"))
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--keep-logs", action="store_true")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("livemigrate: needs root (network namespaces, TUN devices, TCP repair mode)")
    if opts.moves < 0 or opts.bulk_mib < 0 or opts.bulk_rate_mbit < 0 or opts.gap < 0:
        sys.exit("livemigrate: --moves, --gap, --bulk-mib and --bulk-rate-mbit must not be negative")
    if not opts.no_build:
        log("building release binaries ...")
        run(["cargo", "build", "--release", "-q", "-p", "meshlink-agent", "-p", "meshlink-coordinator",
             "-p", "meshctl", "-p", "meshlink-chat"], cwd=REPO, capture=False)
        run(["cargo", "build", "--release", "-q", "-p", "meshlink-tests", "--bin", "meshlink-xfer"],
            cwd=REPO, capture=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    bench = LiveBench(opts)
    res = {}
    try:
        bench.setup()
        bench.start()
        if opts.moves:
            res["chat"] = bench.chat()
        if opts.bulk_mib:
            res["bulk"] = bench.bulk()
        env = bench.environment()
    except BaseException:
        log(f"logs: {bench.tmp}")
        opts.keep_logs = True
        raise
    finally:
        bench.cleanup()
    publish(report(res, opts), env, opts, res)


if __name__ == "__main__":
    main()
