#!/usr/bin/env python3
"""Ping under load only, with more rounds than netbench.py, and optionally two agent builds side
by side (an A/B of a latency change) against wireguard-go.

    python3 benches/pingload.py                                   # release agent vs wireguard-go, 6 rounds
    python3 benches/pingload.py --agent old=/tmp/agent-old --agent new=target/release/meshlink-agent

The bed is netbench.py's (two namespaces on a veth, tunnel MTU 1420). Per round and
implementation, with the tunnel started fresh: a 1-stream `iperf3 -t 8` from side A, then after
1 s `ping -c COUNT -i 0.01` from A over the tunnel; the ping's average and p99, and the
iperf3 rate. Implementations alternate, the order rotating each round. Prints one line per run
and the medians. No build: build the release agent first (netbench.py does).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netbench  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    ap.add_argument("--agent", action="append", metavar="NAME=PATH",
                    help=f"an agent build to measure (repeat; default meshlink={target}/release/meshlink-agent)")
    ap.add_argument("--no-wireguard-go", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--count", type=int, default=300, help="pings per run (every 10 ms)")
    ap.add_argument("--json", help="write every run here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pingload: needs root (network namespaces and TUN devices)")
    agents = dict(x.split("=", 1) for x in (a.agent or [f"meshlink={target}/release/meshlink-agent"]))
    impls = list(agents) + ([] if a.no_wireguard_go else ["wireguard-go"])

    class Opts:
        keep_logs = False
        ping_count = a.count
        time = 8
        agent_bin = None

    bench = netbench.Bench(Opts)
    runs = {i: [] for i in impls}
    try:
        bench.setup()
        for r in range(a.rounds):
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                kind = "meshlink" if impl in agents else impl
                Opts.agent_bin = agents.get(impl)
                daemons, dst = bench.start(kind)
                try:
                    server = bench.iperf_server(f"{impl}-{r}")
                    load = subprocess.Popen(["ip", "netns", "exec", bench.ns_a, "iperf3", "-c", dst, "-p",
                                             str(netbench.IPERF_PORT), "-t", "8", "-J"],
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    time.sleep(1.0)
                    p = bench.ping(dst)
                    out, _ = load.communicate(timeout=60)
                    gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
                    bench.stop(server)
                finally:
                    bench.teardown(daemons)
                runs[impl].append({"avg_ms": p["avg_ms"], "p99_ms": p["p99_ms"], "gbps": gbps})
                print(f"round {r + 1}/{a.rounds} {impl}: ping avg {p['avg_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms; "
                      f"load {gbps:.2f} Gbit/s", flush=True)
    finally:
        bench.cleanup()
    print("\n| implementation | ping under load avg ms | p99 ms | load Gbit/s |\n|---|---|---|---|")
    for impl, v in runs.items():
        med = lambda k: statistics.median(x[k] for x in v)  # noqa: E731
        print(f"| {impl} | {med('avg_ms'):.2f} | {med('p99_ms'):.2f} | {med('gbps'):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
