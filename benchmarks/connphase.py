#!/usr/bin/env python3
"""Connection set-up, phase by phase: direct bus vs xdg-dbus-proxy vs checkouts of ours.

proxybench's ``conn`` times a whole client process, and spawning it is ~2 ms of the
~2.5: the proxy's own share drowns. Here a raw-socket client does what libdbus does
(``AUTH EXTERNAL``, ``NEGOTIATE_UNIX_FD``, ``BEGIN`` + Hello, one call) and times each
answer, and the proxy's CPU per connection is read from /proc schedstat.

    .venv/bin/python benchmarks/connphase.py                     # one bus: direct, xdg, ours
    .venv/bin/python benchmarks/connphase.py --gap 0.01          # 10 ms idle before each one
    .venv/bin/python benchmarks/connphase.py --own-bus xdg base=/tmp/old now=.

Default (shared bus): one private dbus-daemon and ``dbus-test-tool echo``; direct,
``xdg-dbus-proxy --filter --talk=NAME`` and our service from this checkout (a filtered
server minted by benchmarks/mint.py) take turns, one connection each, ``--gap`` seconds
apart. ``--own-bus VARIANT...``: each variant (``xdg`` or ``NAME=REPO_DIR``) gets a bus and
echo service of its own, so two versions of ours can be compared; with a gap, every
process involved is as cold as it is when a desktop app starts. Columns: median
microseconds per phase, the whole set-up, and the proxy's CPU; the summary line gives the
total of each variant over the first one's. On one shared bus it also prints what
each proxy spends on a connection it does not proxy (a client of the direct variant).
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.bus import PrivateBus, started_bus  # noqa: E402
from tests.support.sasl import BEGIN, NEGOTIATE, opening  # noqa: E402
from tests.support.wire import driver_call, method_call, wire_length  # noqa: E402

NAME = "com.example.ProxyBench.Echo"
DRIVER = "org.freedesktop.DBus"
PHASES = ("auth", "negotiate", "begin+hello", "call")


HELLO = driver_call(1, "Hello")
PING = method_call(2, NAME, "/", "org.freedesktop.DBus.Peer", "Ping")
AUTH = opening(begin=False)


def _messages(buf: bytes) -> int:
    """Whole messages at the start of ``buf``."""
    n = pos = 0
    while len(buf) - pos >= 16:
        size = wire_length(buf, pos)
        if pos + size > len(buf):
            break
        pos += size
        n += 1
    return n


def _line_done(buf: bytes) -> bool:
    return buf.endswith(b"\r\n")


def _until(sock: socket.socket, done: object, buf: bytes = b"") -> bytes:
    """Read until ``done(buf)``; return everything read (with what ``buf`` held)."""
    while not done(buf):  # type: ignore[operator]
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the proxy closed the connection")
        buf += chunk
    return buf


def one_connection(path: str) -> list[float]:
    """Seconds for each phase of one libdbus-like set-up and first call.

    Like libdbus's dbus_bus_register, the Hello phase ends with the Hello reply; the
    NameAcquired signal behind it may arrive during the call phase, which ends
    once both it and the call's reply are in.
    """
    t = [time.perf_counter()]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(AUTH)
        _until(sock, _line_done)
        t.append(time.perf_counter())
        sock.sendall(NEGOTIATE)
        _until(sock, _line_done)
        t.append(time.perf_counter())
        sock.sendall(BEGIN + HELLO)
        buf = _until(sock, lambda b: _messages(b) >= 1)  # the Hello reply
        t.append(time.perf_counter())
        sock.sendall(PING)
        _until(sock, lambda b: _messages(b) >= 3, buf)  # + NameAcquired, the Ping reply
        t.append(time.perf_counter())
    finally:
        sock.close()
    return [b - a for a, b in itertools.pairwise(t)]


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


class Variant:
    """One way of reaching the echo service: its socket path and the proxy's pid."""

    def __init__(self, label: str, path: str, pid: int | None) -> None:
        """``pid`` None: the direct bus (no proxy CPU to count)."""
        self.label, self.path, self.pid = label, path, pid
        self.phases: list[list[float]] = []
        self.cpu: list[int] = []
        self.foreign_cpu: list[int] = []  # while a client connected straight to the bus


def _unix_path(address: str) -> str:
    return address.split("path=", 1)[1].split(",", 1)[0]


def start_variant(label: str, spec: str, bus: PrivateBus, procs: list[subprocess.Popen[bytes]],
                  python: str) -> Variant:
    """Start xdg-dbus-proxy or our service (from checkout ``spec``) on ``bus``."""
    tmp = tempfile.mkdtemp(prefix="connphase-")
    if spec == "direct":
        return Variant(label, _unix_path(bus.address), None)
    if spec == "xdg":
        sock = os.path.join(tmp, "xdg.sock")
        p = subprocess.Popen(["xdg-dbus-proxy", bus.address, sock, "--filter", f"--talk={NAME}"])
        procs.append(p)
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        return Variant(label, sock, p.pid)
    runtime = os.path.join(tmp, "runtime")
    os.mkdir(runtime, 0o700)
    mint = subprocess.Popen(
        [python, os.path.join(spec, "benchmarks", "mint.py"), bus.address, "--filter",
         "--talk", NAME],
        stdout=subprocess.PIPE, env=dict(os.environ, XDG_RUNTIME_DIR=runtime),
    )
    procs.append(mint)
    assert mint.stdout is not None
    address = mint.stdout.readline().decode().strip()
    if not address:
        raise SystemExit(f"{label}: mint.py printed no address")
    service = int(subprocess.check_output(["pgrep", "-P", str(mint.pid)]).split()[0])
    return Variant(label, _unix_path(address), service)


def main() -> int:
    """Parse arguments, run the connections, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=300, help="connections per variant [300]")
    ap.add_argument("--gap", type=float, default=0.001, help="idle seconds before each [0.001]")
    ap.add_argument("--own-bus", nargs="+", metavar="VARIANT",
                    help="xdg or NAME=REPO_DIR, each on a bus of its own")
    ap.add_argument("--python", default=sys.executable, help="Python for our service")
    args = ap.parse_args()
    if args.own_bus:
        specs = [(v, "xdg") if v == "xdg" else tuple(v.split("=", 1)) for v in args.own_bus]
    else:
        specs = [("direct", "direct"), ("xdg", "xdg"), ("ours", REPO)]
    buses: list[PrivateBus] = []
    procs: list[subprocess.Popen[bytes]] = []
    variants: list[Variant] = []
    try:
        for label, spec in specs:
            if not buses or args.own_bus:
                bus = started_bus()
                buses.append(bus)
                env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
                procs.append(subprocess.Popen(["dbus-test-tool", "echo", f"--name={NAME}"],
                                              env=env))
                time.sleep(0.3)
            variants.append(start_variant(label, os.path.abspath(spec) if spec not in (
                "direct", "xdg") else spec, buses[-1], procs, args.python))
        time.sleep(0.3)
        for v in variants:  # warm-up, not recorded
            for _ in range(10):
                one_connection(v.path)
        for rep in range(args.reps):
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:
                time.sleep(args.gap)
                if v.pid is None:  # direct: what it costs the proxies on the same bus
                    others = {o.label: cpu_ns(o.pid) for o in variants if o.pid}
                    v.phases.append(one_connection(v.path))
                    time.sleep(0.002)
                    for o in variants:
                        if o.pid:
                            o.foreign_cpu.append(cpu_ns(o.pid) - others[o.label])
                    continue
                c0 = cpu_ns(v.pid)
                v.phases.append(one_connection(v.path))
                time.sleep(0.002)  # let the proxy finish the close
                v.cpu.append(cpu_ns(v.pid) - c0)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        for b in buses:
            b.stop()
    print(f"# connphase reps={args.reps} gap={args.gap}s "
          f"{'own bus each' if args.own_bus else 'one shared bus'}; median microseconds")
    print(f"  {'variant':8}" + "".join(f"{p:>13}" for p in PHASES) + f"{'total':>9}{'CPU':>8}")
    totals = {}
    for v in variants:
        cols = [statistics.median(c) * 1e6 for c in zip(*v.phases, strict=True)]
        totals[v.label] = statistics.median(sum(p) for p in v.phases) * 1e6
        cpu = f"{statistics.median(v.cpu) / 1e3:8.0f}" if v.pid else f"{'-':>8}"
        print(f"  {v.label:8}" + "".join(f"{c:13.0f}" for c in cols)
              + f"{totals[v.label]:9.0f}{cpu}")
    for v in variants:
        if v.foreign_cpu:
            print(f"# {v.label}: {statistics.median(v.foreign_cpu) / 1e3:.0f} us CPU per "
                  "connection made straight to the bus (its NameOwnerChanged signals)")
    first = variants[0].label
    print("SUMMARY connphase total/" + first + ": "
          + " ".join(f"{k}={t / totals[first]:.2f}" for k, t in totals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
