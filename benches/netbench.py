#!/usr/bin/env python3
"""Side-by-side throughput, latency and CPU of meshlink-agent against the stock tunnels.

One command, as root:

    python3 benches/netbench.py                      # build release agent, 3 rounds, 10 s runs
    python3 benches/netbench.py --rounds 5 --time 20
    python3 benches/netbench.py --only veth,wg-go-trixie --time 3   # no build, no agent
    python3 benches/netbench.py --with-boringtun     # also boringtun-cli, if on PATH

Setup (mirrors shared/BASELINES.md): two network namespaces joined by a veth with MTU 1500
(underlay 198.18.0.1 and .2), tunnel MTU 1420, overlay 100.64.0.1 and .2; both tunnel ends,
the iperf3 client and server all on this machine. Implementations measured in one run:

  veth          no tunnel: iperf3 straight over the veth (the ceiling)
  meshlink      target/release/meshlink-agent on both ends (`up --config`)
  wg-go-trixie  Debian trixie's wireguard-go (0.0.20231211: TUN offload, UDP GSO/GRO), what users
                run today; fetched without installing by ../shared/tools/get-wireguard-go-new.sh
                into target/baselines/ (or --wireguard-go-new PATH)
  gotatun       gotatun-cli (Mullvad's maintained boringtun fork; `cargo install --locked
                gotatun-cli`; on PATH or --gotatun PATH)
  wireguard-go  Debian bookworm's wireguard-go from PATH (0.0.20220316, no offload): history
  boringtun     boringtun-cli (--with-boringtun, on PATH): history
Every stock tunnel is configured the stock way, with `wg setconf` over its UAPI socket, and
labelled in the report with the version it printed. The ratios are against each modern
baseline present (trixie's wireguard-go and gotatun) and, for history, bookworm's.

Per implementation and round, with the tunnel started fresh:
  - `iperf3 -c PEER -t T -O 1 -J`, 1 stream and `-P 4`: sum received bits/s;
  - `ping -c 200 -i 0.01` idle: average and p99 of the per-packet times;
  - the same ping while a 1-stream iperf3 runs ("under load");
  - daemon CPU on both ends: utime+stime deltas from /proc/PID/stat over the 1-stream iperf3
    run, in cores (1.0 = one core busy all the time).
Every implementation runs once per round; the order rotates each round. The report is the
median [min-max] over rounds, as a markdown table, with ratios against the baselines and raw
veth. `--json FILE` also writes every raw sample.

Only python3's standard library is used. Everything made (namespaces, veth, processes, UAPI
sockets, temp files) is removed on exit, also on Ctrl-C or SIGTERM. Names carry the prefix
`mlb<pid>` so two runs never collide. No packet leaves the two namespaces.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# log, run and tail are also netbench.log, .run and .tail for scripts that import netbench.
from bed import (REPO, Harness, cargo_build, interrupt_on, log, pings, publish,  # noqa: E402,F401
                 release_dir, remove_uapi_socket, root_and_tun, run, tail)

UNDERLAY_A, UNDERLAY_B = "198.18.0.1", "198.18.0.2"
OVERLAY_A, OVERLAY_B = "100.64.0.1", "100.64.0.2"
WG_PORT = 51820
IPERF_PORT = 5201
TUNNEL_MTU = 1420
ALL_IMPLS = ["veth", "meshlink", "wg-go-trixie", "gotatun", "wireguard-go", "boringtun"]
DEFAULT_IMPLS = "veth,meshlink,wg-go-trixie,gotatun,wireguard-go"
# The baselines the ratios are taken against, in the report's order: the modern ones first.
BASELINES = ["wg-go-trixie", "gotatun", "wireguard-go"]
LABELS = {
    "veth": "raw veth, no tunnel (the ceiling)",
    "meshlink": "meshlink-agent",
    "wg-go-trixie": "wireguard-go (Debian trixie)",
    "gotatun": "gotatun-cli",
    "wireguard-go": "wireguard-go (Debian bookworm)",
    "boringtun": "boringtun-cli",
}
BASELINE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                               "tools", "get-wireguard-go-new.sh")


def stock_command(impl, opts, iface):
    """(argv, extra environment) that starts stock implementation `impl` on `iface`, in the
    foreground, as its users run it."""
    if impl == "wg-go-trixie":
        return [opts.wireguard_go_new, iface], {"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
    if impl == "wireguard-go":
        return ["wireguard-go", iface], {"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
    if impl == "gotatun":
        return [opts.gotatun, "--foreground", "--disable-drop-privileges", iface], {}
    if impl == "boringtun":
        return ["boringtun-cli", iface, "--foreground", "--disable-drop-privileges"], {}
    raise ValueError(impl)


def stock_version(impl, opts):
    """What `impl` says of its own version, one line."""
    program = stock_command(impl, opts, "-")[0][0]
    out = subprocess.run([program, "--version"], capture_output=True, text=True)
    line = (out.stdout or out.stderr).strip().splitlines()
    # wireguard-go prints "wireguard-go vX": the label already says what it is.
    return line[0].split()[-1] if line else "?"


CLK_TCK = os.sysconf("SC_CLK_TCK")


class Bench(Harness):
    """Owns everything the run creates; `cleanup` removes it all."""

    poll_interval = 0.1

    def __init__(self, opts):
        super().__init__(opts, f"mlb{os.getpid()}")
        self.ns_a = f"{self.prefix}-a"
        self.ns_b = f"{self.prefix}-b"
        self.veth_a = f"{self.prefix}va"
        self.veth_b = f"{self.prefix}vb"
        self.if_a = f"{self.prefix}a"
        self.if_b = f"{self.prefix}b"
        self.interfaces = [self.if_a, self.if_b]  # their UAPI sockets go in cleanup
        self.keys = {}

    # ---- plumbing -------------------------------------------------------------------------

    def ns(self, ns, *args, check=True):
        return run(["ip", "netns", "exec", ns, *args], check=check)

    # Starts a daemon in namespace `ns` (a name, not a host: pingload.py calls it too).
    spawn = Harness.spawn_in

    # ---- topology -------------------------------------------------------------------------

    def setup(self):
        for ns in (self.ns_a, self.ns_b):
            self.add_namespace(ns)
        run(["ip", "link", "add", self.veth_a, "netns", self.ns_a, "mtu", "1500", "type", "veth",
             "peer", "name", self.veth_b, "netns", self.ns_b, "mtu", "1500"])
        for ns, dev, addr in ((self.ns_a, self.veth_a, UNDERLAY_A), (self.ns_b, self.veth_b, UNDERLAY_B)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        self.wait_for("underlay ping", 10, lambda: pings(self.ns_a, UNDERLAY_B))
        for side in ("a", "b"):
            priv = run(["wg", "genkey"]).strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                                 check=True).stdout.strip()
            key_file = os.path.join(self.tmp, f"{side}.key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, (priv + "\n").encode())
            os.close(fd)
            self.keys[side] = (priv, pub, key_file)

    # ---- tunnels --------------------------------------------------------------------------

    def sides(self):
        """(side, namespace, iface, own overlay, peer side, peer underlay, peer overlay)."""
        return (("a", self.ns_a, self.if_a, OVERLAY_A, "b", UNDERLAY_B, OVERLAY_B),
                ("b", self.ns_b, self.if_b, OVERLAY_B, "a", UNDERLAY_A, OVERLAY_A))

    def start(self, impl):
        """Starts `impl` on both ends; returns (daemon processes, address to measure against)."""
        if impl == "veth":
            return [], UNDERLAY_B
        daemons = []
        for side, ns, iface, overlay, peer, peer_underlay, peer_overlay in self.sides():
            _, _, key_file = self.keys[side]
            peer_pub = self.keys[peer][1]
            if impl == "meshlink":
                conf = os.path.join(self.tmp, f"{side}.toml")
                with open(conf, "w") as f:
                    f.write(f'interface = "{iface}"\nprivate_key_file = "{key_file}"\n'
                            f'listen_port = {WG_PORT}\naddresses = ["{overlay}/24"]\nmtu = {TUNNEL_MTU}\n\n'
                            f'[[peers]]\npublic_key = "{peer_pub}"\nendpoint = "{peer_underlay}:{WG_PORT}"\n'
                            f'allowed_ips = ["{peer_overlay}/32"]\n')
                proc = self.spawn(ns, [self.opts.agent_bin, "up", "--config", conf], f"{impl}-{side}.log")
            else:
                argv, env = stock_command(impl, self.opts, iface)
                proc = self.spawn(ns, argv, f"{impl}-{side}.log", env=env or None)
            daemons.append(proc)
            self.wait_for(f"{impl} {iface} UAPI socket", 20,
                          lambda: subprocess.run(["ip", "netns", "exec", ns, "wg", "show", iface],
                                                 capture_output=True).returncode == 0, proc)
            if impl != "meshlink":
                # The stock way: `wg setconf` over the UAPI socket, then iproute2.
                conf = os.path.join(self.tmp, f"{impl}-{side}.conf")
                fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(fd, (f"[Interface]\nPrivateKey = {self.keys[side][0]}\nListenPort = {WG_PORT}\n\n"
                              f"[Peer]\nPublicKey = {peer_pub}\nEndpoint = {peer_underlay}:{WG_PORT}\n"
                              f"AllowedIPs = {peer_overlay}/32\n").encode())
                os.close(fd)
                self.ns(ns, "wg", "setconf", iface, conf)
                run(["ip", "-n", ns, "addr", "add", f"{overlay}/24", "dev", iface])
                run(["ip", "-n", ns, "link", "set", "dev", iface, "mtu", str(TUNNEL_MTU), "up"])
        if getattr(self.opts, "txqueuelen", None):
            # The TUN devices' queue length (how much the kernel queues ahead of a packet).
            for ns, iface in ((self.ns_a, self.if_a), (self.ns_b, self.if_b)):
                run(["ip", "-n", ns, "link", "set", "dev", iface, "txqueuelen", str(self.opts.txqueuelen)])
        self.wait_for(f"{impl} tunnel to pass a ping", 20, lambda: pings(self.ns_a, OVERLAY_B))
        return daemons, OVERLAY_B

    def teardown(self, daemons):
        for proc in daemons:
            self.stop(proc)
        # Wait until the interfaces are gone so the next implementation can reuse the names.
        for ns, iface in ((self.ns_a, self.if_a), (self.ns_b, self.if_b)):
            self.wait_for(f"{iface} to disappear", 10,
                          lambda: subprocess.run(["ip", "-n", ns, "link", "show", iface],
                                                 capture_output=True).returncode != 0)
            remove_uapi_socket(iface)

    # ---- measurements ---------------------------------------------------------------------

    def iperf(self, target, streams, seconds, omit=1):
        args = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", str(omit), "-J"]
        if streams > 1:
            args += ["-P", str(streams)]
        out = self.ns(self.ns_a, *args, check=False)
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 printed no JSON: {out[-500:]}")
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        end = data["end"]
        return {
            "bps": end["sum_received"]["bits_per_second"],
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
        }

    def ping(self, target):
        out = self.ns(self.ns_a, "ping", "-n", "-c", str(self.opts.ping_count), "-i", "0.01", target,
                      check=False)
        times = [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]
        if not times:
            raise RuntimeError(f"ping {target} got no replies:\n{out[-500:]}")
        times.sort()
        p99 = times[max(0, math.ceil(0.99 * len(times)) - 1)]
        return {"avg_ms": statistics.fmean(times), "p99_ms": p99,
                "lost": self.opts.ping_count - len(times)}

    def scheduling(self):
        """Each agent's priority at the end of a run and how often its real-time guard released
        it (so that a run shows whether the guard fired), as `side: state/releases`."""
        out = []
        for side, ns, iface in (("a", self.ns_a, self.if_a), ("b", self.ns_b, self.if_b)):
            text = self.ns(ns, self.opts.agent_bin, "status", "--interface", iface, "-o", "json",
                           check=False)
            try:
                s = json.loads(text)["scheduling"]
                out.append(f"{side}: {s['state']}/{s['releases']}")
            except (json.JSONDecodeError, KeyError, TypeError):
                out.append(f"{side}: ?")
        return ", ".join(out)

    def iperf_server(self, tag):
        """Starts iperf3's server on side B and returns it once it listens."""
        server = self.spawn(self.ns_b, ["iperf3", "-s", "-p", str(IPERF_PORT)], f"iperf3-server-{tag}.log")
        # iperf3 block-buffers its banner into a file: ask the socket table instead.
        self.wait_for("iperf3 server", 10,
                      lambda: str(IPERF_PORT) in run(["ip", "netns", "exec", self.ns_b, "ss", "-Hltn",
                                                      f"sport = :{IPERF_PORT}"], check=False), server)
        return server

    def measure(self, impl):
        daemons, target = self.start(impl)
        try:
            server = self.iperf_server(impl)
            t = self.opts.time

            cpu0, wall0 = cpu_ticks(daemons), time.monotonic()
            one = self.iperf(target, 1, t)
            cores = None
            if daemons:
                cores = (cpu_ticks(daemons) - cpu0) / CLK_TCK / (time.monotonic() - wall0)
            four = self.iperf(target, 4, t)
            idle = self.ping(target)

            # Ping under load: a 1-stream flow long enough to cover the whole ping run.
            ping_secs = self.opts.ping_count * 0.01 + 1
            load_secs = max(t, math.ceil(ping_secs) + 2)
            load = subprocess.Popen(
                ["ip", "netns", "exec", self.ns_a, "iperf3", "-c", target, "-p", str(IPERF_PORT),
                 "-t", str(load_secs), "-J"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.track(load)
            time.sleep(1.0)  # past slow start
            loaded = self.ping(target)
            try:
                load.wait(load_secs + 15)
            finally:
                self.stop(load)
            self.stop(server)
            return {"tcp1_bps": one["bps"], "tcp1_retransmits": one["retransmits"],
                    "tcp4_bps": four["bps"], "tcp4_retransmits": four["retransmits"],
                    "ping_idle": idle, "ping_load": loaded, "cpu_cores": cores,
                    "scheduling": self.scheduling() if impl == "meshlink" else None}
        finally:
            self.teardown(daemons)


def cpu_ticks(procs):
    """utime+stime (clock ticks) summed over processes, from /proc/PID/stat."""
    total = 0
    for proc in procs:
        with open(f"/proc/{proc.pid}/stat") as f:
            # The command name may contain spaces and parentheses: split after the last ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total


# ---- reporting ------------------------------------------------------------------------------

def spread(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results, impls, opts):
    lines = []
    lines.append(f"Two namespaces, veth MTU 1500, tunnel MTU {TUNNEL_MTU}; iperf3 -t {opts.time} -O 1; "
                 f"ping -c {opts.ping_count} -i 0.01. Median [min-max] over {opts.rounds} round(s), "
                 "order rotated each round."
                 + (f" Every tunnel's TUN txqueuelen set to {opts.txqueuelen}." if getattr(opts, "txqueuelen", None) else ""))
    lines.append("")
    lines.append("| implementation | TCP 1 stream Gbit/s | TCP 4 streams | ping idle avg / p99 ms "
                 "| ping under 1-stream TCP, avg / p99 ms | daemon CPU (both ends), cores |")
    lines.append("|---|---|---|---|---|---|")
    for impl in impls:
        rs = results[impl]
        gb1 = [r["tcp1_bps"] / 1e9 for r in rs]
        gb4 = [r["tcp4_bps"] / 1e9 for r in rs]
        fmt = "{:.2f}" if max(gb1 + gb4) < 10 else "{:.1f}"
        idle = f"{med([r['ping_idle']['avg_ms'] for r in rs]):.2f} / {med([r['ping_idle']['p99_ms'] for r in rs]):.2f}"
        load = f"{med([r['ping_load']['avg_ms'] for r in rs]):.2f} / {med([r['ping_load']['p99_ms'] for r in rs]):.2f}"
        cpu = spread([r["cpu_cores"] for r in rs], "{:.2f}")
        lines.append(f"| {label(impl, opts)} | {spread(gb1, fmt)} | {spread(gb4, fmt)} | {idle} | {load} | {cpu} |")

    tunnels = [i for i in impls if i != "veth"]
    for base in [b for b in BASELINES if b in tunnels]:
        if len(tunnels) < 2:
            break
        lines.append("")
        lines.append(f"Against {label(base, opts)}, ratio of medians (throughput: higher is better; "
                     "latency and CPU: lower is better):")
        lines.append("")
        lines.append("| implementation | TCP 1 stream | TCP 4 streams | ping idle avg / p99 "
                     "| ping loaded avg / p99 | CPU cores | Gbit/s per core, 1 stream (ratio) |")
        lines.append("|---|---|---|---|---|---|---|")
        b = summary(results[base])
        b_eff = b["tcp1"] / b["cpu"] if b["cpu"] else None
        for impl in [i for i in tunnels if i != base]:
            s = summary(results[impl])
            eff = s["tcp1"] / s["cpu"] if s["cpu"] else None
            eff_text = f"{eff:.2f} ({ratio(eff, b_eff)})" if eff is not None else "-"
            lines.append(f"| {label(impl, opts)} | {ratio(s['tcp1'], b['tcp1'])} | {ratio(s['tcp4'], b['tcp4'])} "
                         f"| {ratio(s['idle_avg'], b['idle_avg'])} / {ratio(s['idle_p99'], b['idle_p99'])} "
                         f"| {ratio(s['load_avg'], b['load_avg'])} / {ratio(s['load_p99'], b['load_p99'])} "
                         f"| {ratio(s['cpu'], b['cpu'])} | {eff_text} |")
    if "veth" in impls and tunnels:
        lines.append("")
        lines.append("Against raw veth (the ceiling), share of its median throughput:")
        lines.append("")
        lines.append("| implementation | TCP 1 stream | TCP 4 streams |")
        lines.append("|---|---|---|")
        b = summary(results["veth"])
        for impl in tunnels:
            s = summary(results[impl])
            lines.append(f"| {label(impl, opts)} | {100 * s['tcp1'] / b['tcp1']:.1f}% | {100 * s['tcp4'] / b['tcp4']:.1f}% |")
    return "\n".join(lines)


def label(impl, opts):
    """The report's name for `impl`, with the version it printed for a stock tunnel."""
    version = getattr(opts, "versions", {}).get(impl)
    return f"{LABELS[impl]} [{version}]" if version else LABELS[impl]


def summary(rs):
    return {
        "tcp1": med([r["tcp1_bps"] / 1e9 for r in rs]),
        "tcp4": med([r["tcp4_bps"] / 1e9 for r in rs]),
        "idle_avg": med([r["ping_idle"]["avg_ms"] for r in rs]),
        "idle_p99": med([r["ping_idle"]["p99_ms"] for r in rs]),
        "load_avg": med([r["ping_load"]["avg_ms"] for r in rs]),
        "load_p99": med([r["ping_load"]["p99_ms"] for r in rs]),
        "cpu": med([r["cpu_cores"] for r in rs]),
    }


def ratio(x, y):
    if x is None or y is None or y == 0:
        return "-"
    return f"{x / y:.2f}x"


def environment(opts, impls):
    env = Harness.environment(unknown_cpu="?")
    env["iperf3"] = run(["iperf3", "--version"], check=False).splitlines()[0] if shutil.which("iperf3") else None
    for impl in impls:
        if impl in opts.versions:
            env[impl] = opts.versions[impl]
    if "meshlink" in impls:
        env["meshlink"] = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False).strip()
    return env


def resolve_baselines(opts, impls):
    """Finds the modern baselines' binaries (fetching trixie's wireguard-go when not given) and
    sets `opts.versions`; False, with the reason printed, when one cannot be had."""
    if "wg-go-trixie" in impls and not opts.wireguard_go_new:
        dest = os.path.join(os.path.dirname(release_dir()), "baselines")
        got = subprocess.run(["bash", BASELINE_SCRIPT, dest], capture_output=True, text=True)
        if got.returncode != 0:
            print(f"fetching trixie's wireguard-go with {BASELINE_SCRIPT} failed:\n{got.stderr[-800:]}\n"
                  "pass --wireguard-go-new PATH or leave wg-go-trixie out of --only", file=sys.stderr)
            return False
        opts.wireguard_go_new = got.stdout.strip().splitlines()[-1]
    if "gotatun" in impls and not opts.gotatun:
        opts.gotatun = shutil.which("gotatun")
        if not opts.gotatun:
            print("gotatun not found: cargo install --locked gotatun-cli, or pass --gotatun PATH, "
                  "or leave gotatun out of --only", file=sys.stderr)
            return False
    for flag, path in (("--wireguard-go-new", opts.wireguard_go_new), ("--gotatun", opts.gotatun)):
        if path and not os.access(path, os.X_OK):
            print(f"{flag} {path}: not an executable file", file=sys.stderr)
            return False
    opts.versions = {i: stock_version(i, opts) for i in impls if i not in ("veth", "meshlink")}
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every implementation once (3)")
    p.add_argument("--time", type=int, default=10, help="seconds per iperf3 run, -t (10)")
    p.add_argument("--ping-count", type=int, default=200, help="pings per latency sample (200)")
    p.add_argument("--only", default=DEFAULT_IMPLS,
                   help="comma-separated subset of: " + ",".join(ALL_IMPLS) + " (default: all but boringtun)")
    p.add_argument("--wireguard-go-new", help="trixie's wireguard-go binary (default: fetched into "
                   "<target>/baselines by ../shared/tools/get-wireguard-go-new.sh)")
    p.add_argument("--gotatun", help="gotatun-cli's binary (default: gotatun on PATH)")
    p.add_argument("--with-boringtun", action="store_true", help="add boringtun-cli (must be on PATH)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    p.add_argument("--agent-bin", help="meshlink-agent binary (default: <target>/release/meshlink-agent)")
    p.add_argument("--txqueuelen", type=int, help="set every tunnel's TUN txqueuelen to this after start")
    p.add_argument("--scheduling", choices=["realtime", "normal"],
                   help="MESHLINK_SCHEDULING for the agents (default: the agent's own, realtime)")
    p.add_argument("--json", help="also write all samples to this file")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with daemon logs")
    opts = p.parse_args()
    if opts.scheduling:
        os.environ["MESHLINK_SCHEDULING"] = opts.scheduling

    impls = [i.strip() for i in opts.only.split(",") if i.strip()]
    if opts.with_boringtun and "boringtun" not in impls:
        impls.append("boringtun")
    unknown = [i for i in impls if i not in ALL_IMPLS]
    if unknown:
        p.error(f"unknown implementation(s): {', '.join(unknown)}")
    if not root_and_tun():
        return 1
    needed = {"ip", "iperf3", "ping", "wg"}
    needed |= {"wireguard-go"} if "wireguard-go" in impls else set()
    needed |= {"boringtun-cli"} if "boringtun" in impls else set()
    missing = sorted(t for t in needed if not shutil.which(t))
    if missing:
        hint = " (cargo install boringtun-cli)" if "boringtun-cli" in missing else ""
        print(f"missing tools: {', '.join(missing)}; apt-get install -y iproute2 iputils-ping iperf3 "
              f"wireguard-tools wireguard-go{hint}", file=sys.stderr)
        return 1
    if not resolve_baselines(opts, impls):
        return 1

    if "meshlink" in impls:
        if not opts.agent_bin:
            opts.agent_bin = os.path.join(release_dir(), "meshlink-agent")
        if not opts.no_build:
            cargo_build("meshlink-agent")
        if not os.access(opts.agent_bin, os.X_OK):
            print(f"{opts.agent_bin} not found: build it or pass --agent-bin", file=sys.stderr)
            return 1

    bench = Bench(opts)

    # Turn SIGTERM and SIGHUP into an exception so the `finally` below cleans up.
    interrupt_on(signal.SIGTERM, signal.SIGHUP)

    results = {i: [] for i in impls}
    try:
        bench.setup()
        for rnd in range(opts.rounds):
            order = impls[rnd % len(impls):] + impls[:rnd % len(impls)]
            for impl in order:
                log(f"round {rnd + 1}/{opts.rounds}: {impl}")
                r = bench.measure(impl)
                results[impl].append(r)
                cpu = f"{r['cpu_cores']:.2f}" if r["cpu_cores"] is not None else "-"
                log(f"  tcp1 {r['tcp1_bps'] / 1e9:.3f} Gbit/s, tcp4 {r['tcp4_bps'] / 1e9:.3f} Gbit/s, "
                    f"ping idle {r['ping_idle']['avg_ms']:.3f}/{r['ping_idle']['p99_ms']:.3f} ms, "
                    f"loaded {r['ping_load']['avg_ms']:.3f}/{r['ping_load']['p99_ms']:.3f} ms, cpu {cpu}"
                    + (f", scheduling {r['scheduling']}" if r["scheduling"] else ""))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()

    publish(report(results, impls, opts), environment(opts, impls), opts, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
