#!/usr/bin/env python3
"""Where a tunnel's time goes under one TCP stream: `perf` samples of both ends, sorted into the
stages of the packet path, as CPU time per byte carried.

    python3 benches/profile.py                              # meshlink vs trixie's wireguard-go, 10 s
    python3 benches/profile.py --only meshlink --time 20 --keep DIR   # keep perf.data files

The bed is netbench.py's (two namespaces on a veth, tunnel MTU 1420; the stock tunnels
configured with `wg setconf`). Per implementation: the tunnel started fresh, a 1-stream
`iperf3 -c B -t T` from side A (the sender) to B (the receiver), and after 1 s of it
`perf record -e cpu-clock -g` on each end's daemon (all its threads) for T-2 s. Every sample
is then put in one stage by its call stack (the kernel's frames are complete; user frames are
read as far as the unwinder gets): a stage of the path if a frame names one (leaf to root),
else a generic kind of work found anywhere in the stack, else other:

  encrypt / decrypt   ChaCha20-Poly1305 code (ring, boringtun, Go's x/crypto), by side
  TUN read            the kernel reading the TUN device (tun_chr_read_iter, tun_put_user, ...)
  TUN write           the kernel writing to it (tun_chr_write_iter, tun_get_user, GRO there)
  segmentation        splitting an offloaded super-packet (skb_segment, *gso*, virtio headers)
  UDP send            sendmsg/sendmmsg and the kernel's UDP/IP output below it
  UDP receive         recvmsg/recvmmsg and the kernel's UDP input
  checksum            software checksums (csum_*, *checksum*)
  copy                memcpy/memmove and user copies not inside the stages above
  wake-ups            futex, epoll, scheduling, timers
  memory              page faults and zeroing, allocation and freeing
  other               everything else (the tunnel's own bookkeeping, allocation, ...)
  user code without symbols   a stripped binary's own code (Debian's wireguard-go is stripped:
                      its encryption lands here, not under encrypt/decrypt)

For each end: samples per stage as a share, and as CPU nanoseconds per byte delivered (the
stage's CPU seconds over the bytes iperf3 moved while perf recorded), and as cycles per byte
at the CPU's nominal clock (/proc/cpuinfo: this machine cannot count cycles in a VM; the
cycles are sampled time times the clock, an estimate). Needs root, perf (linux-perf), iperf3.
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netbench  # noqa: E402
from bed import interrupt_on, log, release_dir, root_and_tun, run  # noqa: E402

STAGES = ["encrypt", "decrypt", "TUN read", "TUN write", "segmentation", "UDP send", "UDP receive",
          "checksum", "copy", "wake-ups", "memory", "other", "user code without symbols"]

# (stage, pattern over a frame's symbol). Checked for every frame from the leaf up; the first
# frame that matches any rule decides, in this order of rules for that frame.
CRYPTO = re.compile(r"chacha|poly1305|ChaCha|Poly1305|aead|seal_in_place|open_in_place|"
                    r"x/crypto", re.I)
PATH_RULES = [
    ("TUN read", re.compile(r"^(tun_chr_read_iter|tun_do_read|tun_put_user|tun_ring_recv)")),
    ("TUN write", re.compile(r"^(tun_chr_write_iter|tun_get_user|tun_sendmsg|tun_napi)")),
    ("segmentation", re.compile(r"skb_segment|gso_segment|__skb_gso|gso_split|GSOSplit|"
                                r"virtio_net_hdr|handleGSO|split_gso|gsoSplit", re.I)),
    ("UDP send", re.compile(r"^(udp_sendmsg|udpv6_sendmsg|__sys_sendmsg|__sys_sendmmsg|"
                            r"__x64_sys_sendmsg|__x64_sys_sendmmsg|udp_send_skb|"
                            r"__x64_sys_sendto|ip_finish_output2?|ip_output|veth_xmit)")),
    ("UDP receive", re.compile(r"^(udp_recvmsg|udpv6_recvmsg|__sys_recvmsg|__sys_recvmmsg|"
                               r"__x64_sys_recvmsg|__x64_sys_recvmmsg|__x64_sys_recvfrom|"
                               r"udp_rcv|__udp4_lib_rcv|udp_gro_receive)")),
]
GENERIC_RULES = [
    ("checksum", re.compile(r"csum|checksum", re.I)),
    ("copy", re.compile(r"memcpy|memmove|copy_user|_copy_to_iter|_copy_from_iter|rep_movs",
                        re.I)),
    ("wake-ups", re.compile(r"futex|epoll|schedule|__sched|hrtimer|nanosleep|ep_poll|"
                            r"try_to_wake_up|runtime\.(futex|notesleep|park|netpoll)", re.I)),
    ("memory", re.compile(r"clear_page|page_fault|__alloc_pages|kmalloc|kmem_cache|^malloc|"
                          r"^free$|^cfree|_int_malloc|_int_free|runtime\.mallocgc|__rust_alloc|"
                          r"__rust_dealloc|mmap|munmap|madvise", re.I)),
]


def classify(frames, side):
    """The stage of one sample, from its frames (leaf first): the leaf in a stripped binary's
    own code; else the first frame of the stack that names a stage of the path (the syscall
    or the cipher the time was spent for); else a generic kind of work (copy, checksum,
    wake-up, memory) found anywhere in the stack; else other."""
    if frames and frames[0] == "[unknown user]":
        # A stripped binary (Debian's wireguard-go): its own code cannot be told apart.
        return "user code without symbols"
    for sym in frames:
        if CRYPTO.search(sym):
            return "encrypt" if side == "sender" else "decrypt"
        for stage, pattern in PATH_RULES:
            if pattern.search(sym):
                return stage
    for sym in frames:
        for stage, pattern in GENERIC_RULES:
            if pattern.search(sym):
                return stage
    return "other"


def parse_script(text):
    """Samples of `perf script` output: a list of (leaf-first frames, weight)."""
    samples = []
    frames = None
    for line in text.splitlines():
        if not line.strip():
            if frames is not None:
                samples.append(frames)
            frames = None
            continue
        if not line.startswith((" ", "\t")):
            frames = []  # a sample's header line
            continue
        if frames is None:
            continue
        # "\t    ffffffff8a2b3c4d symbol+0x12 (dso)"
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            sym, _, dso = parts[1].rpartition(" (")
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            if sym == "[unknown]" and "kernel" not in dso:
                sym = "[unknown user]"
            frames.append(sym)
    if frames is not None:
        samples.append(frames)
    return samples


def cpu_mhz():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return None


class Profile(netbench.Bench):
    def profile(self, impl, seconds, freq, keep):
        daemons, target = self.start(impl)
        try:
            server = self.iperf_server(impl)
            load = subprocess.Popen(["ip", "netns", "exec", self.ns_a, "iperf3", "-c", target, "-p",
                                     str(netbench.IPERF_PORT), "-t", str(seconds), "-J", "-i", "1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.track(load)
            time.sleep(1.0)
            window = seconds - 2
            recs = []
            for side, proc in zip(("sender", "receiver"), daemons):
                data = os.path.join(keep or self.tmp, f"{impl}-{side}.perf.data")
                recs.append((side, data, subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-g", "-o", data,
                     "-p", str(proc.pid), "--", "sleep", str(window)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            t0 = time.monotonic()
            for _, _, rec in recs:
                _, err = rec.communicate(timeout=window + 60)
                if rec.returncode != 0:
                    raise RuntimeError(f"perf record failed: {err[-500:]}")
            t1 = time.monotonic()
            out, _ = load.communicate(timeout=seconds + 30)
            self.stop(server)
            intervals = json.loads(out)["intervals"]
            # Bytes received in the intervals perf covered (1 s .. seconds-1 s).
            rate = [i["sum"]["bits_per_second"] for i in intervals[1:1 + window]]
            bytes_moved = sum(rate) / 8
            results = {"impl": impl, "label": netbench.label(impl, self.opts), "gbps":
                       sum(rate) / len(rate) / 1e9 if rate else 0, "window": window,
                       "perf_wall_s": t1 - t0,
                       "bytes": bytes_moved, "sides": {}}
            for side, data, _ in recs:
                text = run(["perf", "script", "-i", data, "-F", "comm,tid,ip,sym,dso"], check=False)
                samples = parse_script(text)
                counts = collections.Counter(classify(f, side) for f in samples)
                tops = collections.Counter(f[0] for f in samples if f)
                results["sides"][side] = {"samples": len(samples), "stages": dict(counts),
                                          "top": tops.most_common(12)}
            return results
        finally:
            self.teardown(daemons)


def report(all_results, freq, mhz):
    lines = []
    for r in all_results:
        lines.append(f"### {r['label']}: {r['gbps']:.2f} Gbit/s while sampled")
        lines.append("")
        lines.append("| stage | sender share | sender ns/KB | sender cycles/B | receiver share "
                     "| receiver ns/KB | receiver cycles/B |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        per_side = r["sides"]
        for stage in STAGES:
            cells = []
            for side in ("sender", "receiver"):
                s = per_side[side]
                n = s["stages"].get(stage, 0)
                total = s["samples"] or 1
                cpu_s = n / freq
                ns_per_kb = cpu_s * 1e9 / (r["bytes"] / 1000) if r["bytes"] else 0
                cyc = cpu_s * mhz * 1e6 / r["bytes"] if (r["bytes"] and mhz) else None
                cells += [f"{100 * n / total:.1f}%", f"{ns_per_kb:.0f}",
                          f"{cyc:.2f}" if cyc is not None else "-"]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        for side in ("sender", "receiver"):
            s = per_side[side]
            cpu_s = s["samples"] / freq
            lines.append("")
            lines.append(f"{side}: {s['samples']} samples = {cpu_s / r['window']:.2f} cores; "
                         f"{cpu_s * 1e9 / (r['bytes'] / 1000):.0f} ns/KB in all. Top leaf symbols: "
                         + ", ".join(f"`{sym}` {100 * n / max(1, s['samples']):.1f}%"
                                     for sym, n in s["top"][:8]))
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="meshlink,wg-go-trixie",
                   help="comma-separated tunnels of netbench.py (default: meshlink,wg-go-trixie)")
    p.add_argument("--time", type=int, default=10, help="seconds of iperf3; perf records T-2 (10)")
    p.add_argument("--freq", type=int, default=2999, help="samples per second per CPU (2999)")
    p.add_argument("--agent-bin", help="meshlink-agent binary (default: <target>/release/meshlink-agent)")
    p.add_argument("--wireguard-go-new", help="trixie's wireguard-go (default: fetched as netbench does)")
    p.add_argument("--gotatun", help="gotatun-cli's binary (default: gotatun on PATH)")
    p.add_argument("--keep", help="keep the perf.data files in this directory")
    p.add_argument("--json", help="also write the results here")
    opts = p.parse_args()
    opts.keep_logs = False
    opts.ping_count = 0
    impls = [i.strip() for i in opts.only.split(",") if i.strip()]
    bad = [i for i in impls if i not in netbench.ALL_IMPLS or i == "veth"]
    if bad:
        p.error(f"not a tunnel of netbench.py: {', '.join(bad)}")
    if opts.time < 4:
        p.error("--time must be at least 4")
    if not root_and_tun():
        return 1
    for tool in ("perf", "iperf3", "wg", "ip"):
        if not shutil.which(tool):
            print(f"missing tool: {tool} (apt-get install linux-perf iperf3 wireguard-tools iproute2)",
                  file=sys.stderr)
            return 1
    if "meshlink" in impls:
        opts.agent_bin = opts.agent_bin or os.path.join(release_dir(), "meshlink-agent")
        if not os.access(opts.agent_bin, os.X_OK):
            print(f"{opts.agent_bin} not found: build it or pass --agent-bin", file=sys.stderr)
            return 1
    if not netbench.resolve_baselines(opts, impls):
        return 1
    if opts.keep:
        os.makedirs(opts.keep, exist_ok=True)
    mhz = cpu_mhz()
    bench = Profile(opts)
    interrupt_on(signal.SIGTERM, signal.SIGHUP)
    results = []
    try:
        bench.setup()
        for impl in impls:
            log(f"profiling {impl}")
            results.append(bench.profile(impl, opts.time, opts.freq, opts.keep))
    finally:
        bench.cleanup()
    text = report(results, opts.freq, mhz)
    print(f"One TCP stream A -> B, perf -e cpu-clock -F {opts.freq} -g on each daemon for "
          f"{opts.time - 2} s; cycles at the nominal {mhz or '?'} MHz.\n")
    print(text)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
