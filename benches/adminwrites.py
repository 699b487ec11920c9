#!/usr/bin/env python3
"""Admin writes per second: one coordinator on its embedded SQLite database, then on a private
PostgreSQL cluster, side by side in the same run.

One command, as root (initdb runs as the `postgres` user):

    python3 benches/adminwrites.py                      # builds the release coordinator; 2000 writes each
    python3 benches/adminwrites.py --writes 5000 --clients 8 --json adminwrites.json

Each store gets a fresh coordinator on loopback (QUIC and admin API on free ports) and a network;
then `--clients` threads send `--writes` admin requests in all, over keep-alive HTTP
connections, of two kinds measured separately: join tokens (`POST /v1/tokens`: one insert, no
map change) and workloads (`POST /v1/workloads`: an address chosen, an insert, the network's
version bumped, a change-log row written and, on PostgreSQL, a notification sent, and a delta
queued). Reported: writes per second and the per-request latency (median, p99). PostgreSQL runs
with its defaults (every commit flushed: fsync, synchronous_commit); SQLite with the
coordinator's settings (WAL, synchronous=NORMAL: commits are flushed at checkpoints), so the
comparison favours SQLite's latency and reflects what each store costs as shipped. Only python3's standard library is used; everything is removed on exit.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bed import PgCluster, log, run, tail  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coord:
    def __init__(self, binary, tmp, name, store=None):
        self.state = os.path.join(tmp, name)
        self.admin = free_port()
        args = [binary, "serve", "--state-dir", self.state, "--listen", f"127.0.0.1:{free_port()}",
                "--admin-listen", f"127.0.0.1:{self.admin}", "--advertise", "127.0.0.1:7443"]
        if store:
            args += ["--store", store]
        self.log = os.path.join(tmp, f"{name}.log")
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, MESHLINK_LOG="warn"))
        deadline = time.monotonic() + 20
        while "coordinator fingerprint:" not in tail(self.log, 50):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{tail(self.log)}")
            time.sleep(0.05)
        with open(os.path.join(self.state, "admin.token")) as f:
            self.token = f.read().strip()

    def request(self, conn, method, path, body):
        conn.request(method, path, body=json.dumps(body),
                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:200]!r}")
        return data

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(coord, kind, writes, clients):
    """`writes` requests of `kind` over `clients` threads: (writes/s, latencies in ms)."""
    lat, errors, lock = [], [], threading.Lock()
    per = [writes // clients + (1 if i < writes % clients else 0) for i in range(clients)]

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", coord.admin, timeout=30)
        mine = []
        try:
            for k in range(per[i]):
                if kind == "tokens":
                    body, path = {"network": "bench"}, "/v1/tokens"
                else:
                    body, path = {"network": "bench", "name": f"w{i}-{k}"}, "/v1/workloads"
                t0 = time.perf_counter()
                coord.request(conn, "POST", path, body)
                mine.append((time.perf_counter() - t0) * 1000)
        except Exception as e:  # reported below
            with lock:
                errors.append(str(e))
        finally:
            conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return len(lat) / took, lat


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=2000, help="requests per kind and store")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release"))
    ap.add_argument("--json", help="write every figure here")
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("adminwrites: needs root (initdb runs as the postgres user)")
    if not opts.no_build:
        log("building the release coordinator ...")
        run(["cargo", "build", "--release", "-q", "-p", "meshlink-coordinator"], cwd=REPO, capture=False)
    binary = os.path.join(opts.bin_dir, "meshlink-coordinator")
    tmp = tempfile.mkdtemp(prefix="mlaw-")
    pg = coords = None
    results = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        pg = PgCluster()
        stores = [("sqlite", None), ("postgresql", pg.create_database("adminwrites"))]
        for name, url in stores:
            c = Coord(binary, tmp, name, url)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", c.admin, timeout=30)
                c.request(conn, "POST", "/v1/networks", {"name": "bench", "cidr": "100.64.0.0/16"})
                conn.close()
                for kind in ("tokens", "workloads"):
                    rate, lat = measure(c, kind, opts.writes, opts.clients)
                    results[f"{name}/{kind}"] = {"per_s": rate, "median_ms": statistics.median(lat),
                                                 "p99_ms": pct(lat, 99), "n": len(lat)}
                    log(f"{name} {kind}: {rate:.0f}/s")
            finally:
                c.stop()
    finally:
        if pg:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n## Admin writes, {opts.writes} per kind, {opts.clients} clients\n")
    print("| store | kind | writes/s | median | p99 | PostgreSQL / SQLite |")
    print("|---|---|---|---|---|---|")
    for kind in ("tokens", "workloads"):
        s, p = results[f"sqlite/{kind}"], results[f"postgresql/{kind}"]
        for name, r in (("SQLite", s), ("PostgreSQL", p)):
            ratio = f"{p['per_s'] / s['per_s']:.2f}x" if name == "PostgreSQL" else ""
            print(f"| {name} | {kind} | {r['per_s']:.0f} | {r['median_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {ratio} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"results": results, "writes": opts.writes, "clients": opts.clients}, f, indent=1)


if __name__ == "__main__":
    main()
