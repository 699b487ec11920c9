#!/usr/bin/env python3
"""Where a ping waits under load: the round trip of each ping taken apart, hop by hop.

    python3 benches/pingpath.py                                    # the release agent
    python3 benches/pingpath.py --impl wg-go-trixie                # trixie's wireguard-go
    python3 benches/pingpath.py --impl wg-go-trixie --realtime     # the same, its threads at SCHED_RR 1
    python3 benches/pingpath.py --scheduling normal                # the agent at normal priority

netbench.py's bed (two namespaces on a veth, tunnel MTU 1420). A 1-stream iperf3 runs from A to
B; after 1.5 s, `ping -c COUNT -i 0.01` from A over the tunnel, while tcpdump stamps each ping
on A's TUN device, on the veth (the encrypted datagram, picked by its length, see
PING_IP_LENS; a datagram of another kind and the same length that gets matched fails the order
check and leaves its ping out) and on B's TUN device. Per ping:

    A send     request on A's TUN  -> its datagram on the veth   (A's TUN queue, A's agent)
    B receive  datagram on the veth -> request on B's TUN        (B's socket queue, B's agent)
    B kernel   request -> reply on B's TUN                       (B's ICMP)
    B send     reply on B's TUN    -> its datagram on the veth   (B's TUN queue, B's agent)
    A receive  datagram on the veth -> reply on A's TUN          (A's socket queue, A's agent)

Prints mean, median and p90 of each, and the iperf3 rate. Root; tcpdump; no build (build the
release agent first). `--realtime` sets SCHED_RR 1 on every thread of both daemons with
`chrt`, to tell scheduling from queueing.
"""

import argparse
import bisect
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netbench  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A ping's datagram on the veth, as IP length: the 84-byte ICMP packet, 32 bytes of WireGuard,
# UDP and IP headers (144), or with the packet padded to 96 bytes (156: wireguard-go pads).
PING_IP_LENS = (144, 156)


def stamps(path, pattern):
    out = []
    with open(path) as f:
        for line in f:
            m = re.match(pattern, line)
            if m:
                out.append(m.groups())
    return out


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="meshlink", choices=["meshlink", "wg-go-trixie", "wireguard-go", "gotatun"])
    ap.add_argument("--agent-bin", default=f"{target}/release/meshlink-agent")
    ap.add_argument("--wireguard-go-new", default=f"{target}/baselines/wireguard-go-new")
    ap.add_argument("--gotatun", default="gotatun")
    ap.add_argument("--count", type=int, default=300, help="pings (every 10 ms)")
    ap.add_argument("--realtime", action="store_true", help="chrt -r 1 every thread of both daemons")
    ap.add_argument("--scheduling", choices=["realtime", "normal"],
                    help="MESHLINK_SCHEDULING for the agents (default: theirs)")
    ap.add_argument("--json", help="write the per-ping figures here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pingpath: needs root (network namespaces, TUN devices, tcpdump)")
    if a.scheduling:
        os.environ["MESHLINK_SCHEDULING"] = a.scheduling

    class Opts:
        keep_logs = False
        ping_count = a.count
        time = 10
        agent_bin = a.agent_bin
        wireguard_go_new = a.wireguard_go_new
        gotatun = a.gotatun
        txqueuelen = None

    bench = netbench.Bench(Opts)
    captures = []
    try:
        bench.setup()
        daemons, dst = bench.start(a.impl)
        if a.realtime:
            for d in daemons:
                # `ip netns exec` execs the daemon: the spawned pid is the daemon's.
                subprocess.run(["chrt", "-a", "-r", "-p", "1", str(d.pid)], check=True,
                               capture_output=True)
        bench.iperf_server(a.impl)
        files = {}
        for name, ns, dev, expr in (("tun_a", bench.ns_a, bench.if_a, "icmp"),
                                    ("tun_b", bench.ns_b, bench.if_b, "icmp"),
                                    ("veth", bench.ns_a, bench.veth_a, "udp and (" + " or ".join(f"ip[2:2] == {n}" for n in PING_IP_LENS) + ")")):
            files[name] = os.path.join(bench.tmp, f"{name}.txt")
            captures.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-n", "-tt", "-B", "16384",
                 "--immediate-mode", expr],
                stdout=open(files[name], "w"), stderr=subprocess.DEVNULL))
        time.sleep(1)
        seconds = a.count // 100 + 4
        iperf = subprocess.Popen(["ip", "netns", "exec", bench.ns_a, "iperf3", "-c", dst, "-p",
                                  str(netbench.IPERF_PORT), "-t", str(seconds), "-J"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.5)
        ping = bench.ping(dst)
        out, _ = iperf.communicate()
        time.sleep(0.5)
        for c in captures:
            c.terminate()
            c.wait()
        gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9

        icmp = r"([\d.]+) IP \S+ > \S+: ICMP echo (request|reply), id \d+, seq (\d+)"
        at = {}
        for name in ("tun_a", "tun_b"):
            for t, kind, seq in stamps(files[name], icmp):
                at[(name, kind, int(seq))] = float(t)
        wire = stamps(files["veth"], r"([\d.]+) IP (\S+)\.\d+ > \S+\.\d+: UDP")
        a_to_b = sorted(float(t) for t, src in wire if src == netbench.UNDERLAY_A)
        b_to_a = sorted(float(t) for t, src in wire if src != netbench.UNDERLAY_A)

        hops = ["A send", "B receive", "B kernel", "B send", "A receive", "round trip"]
        rows = {h: [] for h in hops}
        for seq in range(1, a.count + 1):
            try:
                t1, t4 = at[("tun_a", "request", seq)], at[("tun_b", "request", seq)]
                t5, t8 = at[("tun_b", "reply", seq)], at[("tun_a", "reply", seq)]
            except KeyError:
                continue
            i, j = bisect.bisect_left(a_to_b, t1), bisect.bisect_left(b_to_a, t5)
            if i >= len(a_to_b) or j >= len(b_to_a):
                continue
            t2, t6 = a_to_b[i], b_to_a[j]
            if not (t2 <= t4 and t6 <= t8):
                continue  # a datagram of another ping matched: leave this one out
            for h, v in zip(hops, (t2 - t1, t4 - t2, t5 - t4, t6 - t5, t8 - t6, t8 - t1)):
                rows[h].append(v * 1000)
        label = a.impl + (" (SCHED_RR 1 by chrt)" if a.realtime else "")
        print(f"{label}: iperf3 1 stream {gbps:.2f} Gbit/s; ping under it avg {ping['avg_ms']:.3f} ms, "
              f"p99 {ping['p99_ms']:.2f} ms, lost {ping['lost']}; {len(rows['round trip'])} pings taken apart")
        print("| hop | mean ms | median ms | p90 ms |")
        print("|---|---|---|---|")
        for h in hops:
            v = sorted(rows[h])
            if v:
                print(f"| {h} | {statistics.fmean(v):.3f} | {statistics.median(v):.3f} | {v[int(0.9 * len(v))]:.3f} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"impl": label, "gbps": gbps, "ping": ping, "hops_ms": rows}, f)
        bench.teardown(daemons)
    finally:
        for c in captures:
            if c.poll() is None:
                c.kill()
        bench.cleanup()


if __name__ == "__main__":
    main()
