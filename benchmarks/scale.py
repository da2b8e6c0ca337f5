#!/usr/bin/env python3
"""Memory and AddServer latency with many servers: one service vs one xdg-dbus-proxy each.

Ours: one ``python -m xdg_containers serve`` on a private bus; N filtered
servers (AddServer with Filter + Policy {NAME: talk}), each with one idle
client. Theirs: N ``xdg-dbus-proxy --fd=W BUS SOCKET --filter --talk=NAME``
processes (spawned as flatpak does, waiting for the sync byte), each with one
idle client. A client is a raw socket that did SASL EXTERNAL + Hello and then
reads nothing more (no D-Bus library, so the client side stays cheap and
identical for both).

At checkpoints (1, 10, 100, ... N) it records memory from
/proc/PID/smaps_rollup: RSS and PSS of our one service process, and the sums of
RSS and PSS over all xdg-dbus-proxy processes (PSS splits shared library pages
between the processes sharing them, so the PSS sum is the fair total; the RSS
sum counts libc & co. once per process). Also the median AddServer round trip
(resp. spawn + sync byte) and Hello time over the servers added since the
previous checkpoint.

Ratios are given three ways: PSS/PSS and RSS/RSS (the same measure on both
sides), and the strictest for us, our service's RSS (everything it maps, the
interpreter's pages counted whole although the benchmark's own python shares
them) / the PSS sum of the xdg-dbus-proxy processes.
If ``--xdg`` is smaller than ``--servers`` (or the budget runs out), theirs is
extrapolated linearly from the largest measured count, and the output says so.

Run with the project's venv python (dbus-fast):

    .venv/bin/python benchmarks/scale.py [--servers 1000] [--xdg 1000] [--budget 240]

The service runs with ``--limit max_servers=N+16 --limit max_servers_per_uid=N+16``
(the defaults are 512 and 64). Prints a table and one ``SUMMARY`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

from dbus_fast.aio import MessageBus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from startup import (
    TALK_NAME,
    Children,
    XdgProxy,
    add_server,
    memory_kib,
    raise_fd_limit,
    raw_hello,
    spawn_xdg_dbus_proxy,
    start_bus,
    start_service,
    stop_server,
    stop_xdg_dbus_proxy,
    unix_path,
)

from tests.support.processes import descendants

MiB = 1024.0


@dataclass
class Row:
    """One checkpoint of one side."""

    n: int
    rss_kib: int
    pss_kib: int
    setup_ms: float  # median AddServer reply (ours) / spawn + sync byte (xdg) in the segment
    hello_ms: float  # median connect + SASL + Hello in the segment
    fds: int = 0  # open fds of our service (ours only)
    #: ours only: PSS of the service plus every process below it (the anchors, SPEC 10:
    #: the zygote's bwrap and interpreter and one forked anchor per server), and their count
    tree_pss_kib: int = 0
    procs: int = 0


def checkpoints(n: int) -> list[int]:
    out = []
    c = 1
    while c < n:
        out.append(c)
        c *= 10
    out.append(n)
    return out


def median_ms(seconds: list[float]) -> float:
    """The median, in milliseconds."""
    return statistics.median(seconds) * 1e3


def hello_after(
    t0: float, path: str, socks: list[socket.socket], firsts: list[float], hellos: list[float]
) -> None:
    """Record the step that began at ``t0`` (AddServer, or a spawn to its sync byte), then a
    raw Hello on ``path``, whose socket stays open in ``socks``."""
    t1 = time.perf_counter()
    sock, _ = raw_hello(path)
    hellos.append(time.perf_counter() - t1)
    firsts.append(t1 - t0)
    socks.append(sock)


def tree_pss_kib(pid: int) -> tuple[int, int]:
    """(PSS sum, process count) of ``pid`` and its descendants."""
    procs = [pid, *descendants(pid)]
    return sum(memory_kib(p)[1] for p in procs), len(procs)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def run_ours(
    args: argparse.Namespace, bus: str, children: Children
) -> tuple[list[Row], tuple[int, int], int]:
    """N servers on one service; rows, baseline (RSS, PSS), and the count reached."""
    limit = args.servers + 16
    service = start_service(
        bus, children, {"max_servers": limit, "max_servers_per_uid": limit}, args.python
    )
    manager = await MessageBus(bus_address=bus).connect()
    socks: list[socket.socket] = []
    rows: list[Row] = []
    try:
        # One server added, used and stopped first: lazily imported code and caches are
        # in the baseline, so the increments are what servers and connections cost.
        path, address = await add_server(manager, args.talk, "warm-up")
        s, _ = raw_hello(unix_path(address))
        s.close()
        await stop_server(manager, path)
        time.sleep(args.settle)
        base = memory_kib(service.pid)
        deadline = time.monotonic() + args.budget / 2
        adds: list[float] = []
        hellos: list[float] = []
        reached = 0
        for cp in checkpoints(args.servers):
            while reached < cp:
                t0 = time.perf_counter()
                _path, address = await add_server(manager, args.talk, str(reached))
                hello_after(t0, unix_path(address), socks, adds, hellos)
                reached += 1
                if time.monotonic() > deadline:
                    break
            time.sleep(args.settle)
            rss, pss = memory_kib(service.pid)
            tree, procs = tree_pss_kib(service.pid)
            add_ms, hello_ms, fds = median_ms(adds), median_ms(hellos), fd_count(service.pid)
            rows.append(Row(reached, rss, pss, add_ms, hello_ms, fds, tree, procs))
            adds.clear()
            hellos.clear()
            if reached < cp:
                print(f"# ours: budget used up at {reached} servers", file=sys.stderr)
                break
        return rows, base, reached
    finally:
        for s in socks:
            s.close()
        manager.disconnect()
        children.stop(service)


def run_xdg(args: argparse.Namespace, bus: str, children: Children) -> tuple[list[Row], int]:
    """N xdg-dbus-proxy processes; rows (memory summed) and the count reached."""
    d = children.mkdtemp("xdgc-bench-xdp-")
    proxies: list[XdgProxy] = []
    socks: list[socket.socket] = []
    rows: list[Row] = []
    deadline = time.monotonic() + args.budget / 2
    try:
        spawns: list[float] = []
        hellos: list[float] = []
        reached = 0
        for cp in checkpoints(args.xdg):
            while reached < cp:
                sock_path = os.path.join(d, f"bus-{reached}")
                t0 = time.perf_counter()
                proxies.append(spawn_xdg_dbus_proxy(bus, sock_path, args.talk))
                hello_after(t0, sock_path, socks, spawns, hellos)
                reached += 1
                if time.monotonic() > deadline:
                    break
            time.sleep(args.settle)
            rss = pss = 0
            for xp in proxies:
                r, p = memory_kib(xp.proc.pid)
                rss += r
                pss += p
            rows.append(Row(reached, rss, pss, median_ms(spawns), median_ms(hellos)))
            spawns.clear()
            hellos.clear()
            if reached < cp:
                print(f"# xdg-dbus-proxy: budget used up at {reached} processes", file=sys.stderr)
                break
        return rows, reached
    finally:
        for s in socks:
            s.close()
        for xp in proxies:
            try:
                os.close(xp.sync_fd)  # they all exit on this; reap below
            except OSError:
                pass
        for xp in proxies:
            stop_xdg_dbus_proxy(xp)


async def run(args: argparse.Namespace) -> int:
    raise_fd_limit(8 * max(args.servers, args.xdg) + 1024)
    children = Children()
    try:
        bus = start_bus(children)
        t0 = time.monotonic()
        ours, base, n_ours = await run_ours(args, bus, children)
        t_ours = time.monotonic() - t0
        t1 = time.monotonic()
        theirs, n_xdg = run_xdg(args, bus, children) if args.xdg else ([], 0)
        t_xdg = time.monotonic() - t1
    finally:
        children.cleanup()

    print(
        f"scale: filtered servers (policy talk {args.talk}), one idle raw client each; "
        f"ours {t_ours:.1f} s, xdg-dbus-proxy {t_xdg:.1f} s"
    )
    print(
        f"ours baseline (service idle, after one warm-up server): RSS {base[0] / MiB:.1f} MiB, "
        f"PSS {base[1] / MiB:.1f} MiB\n"
    )
    header = (
        f"{'N':>6} | {'ours RSS':>9} {'PSS':>7} {'+KiB/srv':>8} {'fds':>5} "
        f"{'AddSrv ms':>9} {'Hello ms':>8} | {'xdg RSS sum':>11} {'PSS sum':>8} "
        f"{'PSS KiB/p':>9} {'spawn ms':>8} {'Hello ms':>8} | {'ours RSS/xdg PSS':>16} | "
        f"{'procs':>5} {'+anchors PSS':>12} {'/xdg PSS':>8}"
    )
    print(header)
    print("-" * len(header))
    by_n = {r.n: r for r in theirs}
    for r in ours:
        x = by_n.get(r.n)
        per = (r.rss_kib - base[0]) / r.n
        left = (
            f"{r.n:>6} | {r.rss_kib / MiB:>7.1f}Mi {r.pss_kib / MiB:>5.1f}Mi {per:>8.1f} "
            f"{r.fds:>5} {r.setup_ms:>9.2f} {r.hello_ms:>8.2f} | "
        )
        if x is not None:
            right = (
                f"{x.rss_kib / MiB:>9.1f}Mi {x.pss_kib / MiB:>6.1f}Mi "
                f"{x.pss_kib / x.n:>9.0f} {x.setup_ms:>8.2f} {x.hello_ms:>8.2f} | "
                f"{r.rss_kib / x.pss_kib:>16.3f} | "
                f"{r.procs:>5} {r.tree_pss_kib / MiB:>10.1f}Mi {r.tree_pss_kib / x.pss_kib:>8.3f}"
            )
        else:
            right = (
                f"{'-':>11} {'-':>8} {'-':>9} {'-':>8} {'-':>8} | {'-':>16} | "
                f"{r.procs:>5} {r.tree_pss_kib / MiB:>10.1f}Mi {'-':>8}"
            )
        print(left + right)
    for x in theirs:
        if x.n not in {r.n for r in ours}:
            print(
                f"{x.n:>6} | {'-':>9} {'-':>7} {'-':>8} {'-':>5} {'-':>9} {'-':>8} | "
                f"{x.rss_kib / MiB:>9.1f}Mi {x.pss_kib / MiB:>6.1f}Mi "
                f"{x.pss_kib / x.n:>9.0f} {x.setup_ms:>8.2f} {x.hello_ms:>8.2f} | {'-':>16}"
            )
    print()

    last = ours[-1]
    n = last.n
    summary = (
        f"SUMMARY scale N={n}: ours service RSS {last.rss_kib / MiB:.1f} MiB "
        f"(PSS {last.pss_kib / MiB:.1f}, +{(last.rss_kib - base[0]) / n:.1f} KiB/server)"
    )
    if theirs:
        big = theirs[-1]
        pss_per = big.pss_kib / big.n
        rss_per = big.rss_kib / big.n
        if big.n == n:
            x_pss, x_rss, how = big.pss_kib, big.rss_kib, "measured"
        else:
            x_pss, x_rss = pss_per * n, rss_per * n
            how = f"EXTRAPOLATED x{n / big.n:.1f} from {big.n} measured"
        same = last.pss_kib / x_pss
        strict = last.rss_kib / x_pss
        summary += (
            f" | {n} xdg-dbus-proxy ({how}): PSS sum {x_pss / MiB:.1f} MiB "
            f"({pss_per:.0f} KiB each), RSS sum {x_rss / MiB:.1f} MiB"
            f" | ratios (target < 0.100): PSS/PSS={same:.3f} RSS/RSS={last.rss_kib / x_rss:.3f}"
            f" ours_RSS/xdg_PSS={strict:.3f} (strictest: {'met' if strict < 0.1 else 'MISSED'})"
            f" | with anchors: service+anchors PSS {last.tree_pss_kib / MiB:.1f} MiB in "
            f"{last.procs} processes, /xdg PSS sum = {last.tree_pss_kib / x_pss:.3f} "
            f"(SPEC 10 goal < 1: {'met' if last.tree_pss_kib < x_pss else 'MISSED'})"
        )
    first = ours[0]
    summary += (
        f" | AddServer median {first.setup_ms:.2f} ms at N={first.n}, "
        f"{last.setup_ms:.2f} ms at N={n}"
    )
    if theirs:
        summary += f" (xdg spawn+sync {theirs[-1].setup_ms:.2f} ms at N={theirs[-1].n})"
    print(summary)
    if n_ours < args.servers or (args.xdg and n_xdg < args.xdg):
        print(
            f"# note: budget cut the run short (ours {n_ours}/{args.servers}, "
            f"xdg {n_xdg}/{args.xdg})"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=1000, help="our servers [1000]")
    parser.add_argument(
        "--xdg",
        type=int,
        default=None,
        help="xdg-dbus-proxy processes (0: skip) [same as --servers]",
    )
    parser.add_argument("--talk", default=TALK_NAME, help=f"policy talk name [{TALK_NAME}]")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds to wait before each memory reading [0.5]"
    )
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds for both ramps together, half each [240]")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the service [this one]"
    )
    args = parser.parse_args()
    if args.xdg is None:
        args.xdg = args.servers
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
