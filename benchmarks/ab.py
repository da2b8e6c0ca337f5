#!/usr/bin/env python3
"""Interleaved A/B of checkouts of this repository (and xdg-dbus-proxy), each on its own bus.

proxybench puts every variant on one bus, so two versions of our service cannot run in one
proxybench run (both claim the Containers1 name). Here each variant gets a private
dbus-daemon and ``dbus-test-tool echo`` of its own; the client runs alternate between
variants, rotating the order every repetition, and the medians are compared.

    .venv/bin/python benchmarks/ab.py xdg before=/tmp/old-checkout after=.
    .venv/bin/python benchmarks/ab.py --scenarios lat,conn --reps 9 xdg now=.

A variant is ``xdg`` (xdg-dbus-proxy --filter) or NAME=REPO_DIR (our service from that
checkout, through its benchmarks/mint.py, filtered, talk to the echo name). Columns: wall
time and proxy CPU (service process tree, from /proc schedstat) per call, and both as a
ratio to the first variant. Scenarios as proxybench's: lat (queue 1), tput (queue 256),
big (1 MiB bodies, queue 4), conn (one client process per call).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.bus import PrivateBus  # noqa: E402
from tests.support.processes import descendants, stop_all  # noqa: E402

NAME = "com.example.ProxyBench.Echo"
#: dbus-daemon's built-in 128 pending replies would refuse tput's 256 calls in flight.
BUS_LIMITS = {"max_replies_per_connection": 100000, "reply_timeout": 300000}
BIG = 1 << 20


def cpu_seconds(pids: list[int]) -> float:
    """Run time of all threads of ``pids`` (schedstat, ns resolution)."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            continue
    return total / 1e9


class Variant:
    """One proxy under test with its own bus and echo service."""

    def __init__(self, spec: str, tmp: str, python: str) -> None:
        """Start bus, echo and proxy; ``address`` is where clients connect."""
        self.name = spec.split("=", 1)[0]
        self.procs: list[subprocess.Popen[bytes]] = []
        d = tempfile.mkdtemp(dir=tmp)
        self.bus = PrivateBus(limits=BUS_LIMITS)
        bus = self.bus.start()
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus)
        self._start(["dbus-test-tool", "echo", f"--name={NAME}"], env=env)
        time.sleep(0.3)
        if spec == "xdg":
            proxy = self._start(
                ["xdg-dbus-proxy", bus, f"{d}/p.sock", "--filter", f"--talk={NAME}"]
            )
            _wait_for(f"{d}/p.sock")
            self.address = f"unix:path={d}/p.sock"
        else:
            repo = os.path.abspath(spec.split("=", 1)[1])
            runtime = f"{d}/runtime"
            os.mkdir(runtime, 0o700)
            proxy = subprocess.Popen(
                [python, f"{repo}/benchmarks/mint.py", bus, "--filter", "--talk", NAME],
                stdout=subprocess.PIPE,
                env=dict(os.environ, XDG_RUNTIME_DIR=runtime),
            )
            self.procs.append(proxy)
            assert proxy.stdout is not None
            self.address = proxy.stdout.readline().decode().strip()
        self.root = proxy.pid

    def _start(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        """Terminate what this variant started, then its bus."""
        stop_all(self.procs)
        self.bus.stop()


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"ab.py: {path} never appeared")
        time.sleep(0.01)


def run_client(address: str, scenario: str, count: int, payload: str) -> None:
    """One proxybench-style client run (conn: ``count`` client processes of one call)."""
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    spam = ["dbus-test-tool", "spam", f"--dest={NAME}"]
    if scenario == "conn":
        runs = [[*spam, "--count=1"]] * count
    elif scenario == "big":
        runs = [[*spam, f"--count={count}", "--queue=4", "--bytes", "--stdin"]]
    else:
        queue = 1 if scenario == "lat" else 256
        runs = [[*spam, f"--count={count}", f"--queue={queue}"]]
    for argv in runs:
        if scenario == "big":
            with open(payload, "rb") as stdin:
                out = subprocess.run(argv, env=env, capture_output=True, stdin=stdin, check=False)
        else:
            out = subprocess.run(
                argv, env=env, capture_output=True, stdin=subprocess.DEVNULL, check=False
            )
        if out.returncode or out.stderr:
            raise SystemExit(f"ab.py: client failed: {out.stderr.decode()[:300]}")


def main() -> int:
    """Start every variant, alternate client runs between them, print medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="+", help="xdg or NAME=REPO_DIR")
    ap.add_argument("--scenarios", default="lat,tput,big,conn")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lat", type=int, default=3000, help="calls in lat")
    ap.add_argument("--tput", type=int, default=20000, help="calls in tput")
    ap.add_argument("--big", type=int, default=60, help="calls in big")
    ap.add_argument("--conn", type=int, default=50, help="client processes in conn")
    ap.add_argument("--python", default=sys.executable, help="Python for our service")
    a = ap.parse_args()
    counts = {"lat": a.lat, "tput": a.tput, "big": a.big, "conn": a.conn}
    scenarios = a.scenarios.split(",")
    tmp = tempfile.mkdtemp(prefix="xdgc-ab-")
    payload = os.path.join(tmp, "payload")
    with open(payload, "wb") as f:
        f.write(os.urandom(BIG))
    variants: list[Variant] = []
    try:
        for spec in a.variants:
            variants.append(Variant(spec, tmp, a.python))
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rep in range(a.reps):
            k = rep % len(variants)
            for scenario in scenarios:
                for v in variants[k:] + variants[:k]:
                    pids = [v.root, *descendants(v.root)]
                    c0, t0 = cpu_seconds(pids), time.perf_counter()
                    run_client(v.address, scenario, counts[scenario], payload)
                    t1, c1 = time.perf_counter(), cpu_seconds(pids)
                    n = counts[scenario]
                    samples.setdefault((v.name, scenario), []).append(
                        ((t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6)
                    )
        summary = []
        for scenario in scenarios:
            base: tuple[float, float] | None = None
            for v in variants:
                s = samples[(v.name, scenario)]
                wall = statistics.median(x[0] for x in s)
                cpu = statistics.median(x[1] for x in s)
                base = base or (wall, cpu)
                print(
                    f"{scenario:5} {v.name:10} wall {wall:9.1f} us/call ({wall / base[0]:.2f})"
                    f"  proxyCPU {cpu:8.1f} us/call ({cpu / base[1]:.2f})"
                )
                if v is not variants[0]:
                    summary.append(f"{scenario}:{v.name}={wall / base[0]:.2f}/{cpu / base[1]:.2f}")
        print(f"SUMMARY ab reps={a.reps} wall/CPU vs {variants[0].name}: " + " ".join(summary))
    finally:
        for v in variants:
            v.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
