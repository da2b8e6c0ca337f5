#!/usr/bin/env python3
"""What a restart costs (SPEC 13): ``serve --replace`` and a crash, with N servers.

Set-up: a private bus, the service, N filtered servers (AddServer as startup.py
does), one live raw connection on each. Then:

- **hand-over**: ``serve --replace`` is spawned while a manager client calls
  GetServerInfo in a loop and one live connection makes GetId round trips; reported:
  spawn -> READY of the new process, the longest manager call and the longest round
  trip through an old connection during it, whether every old connection still
  answers after it, and how long the old process takes to exit once they close;
- **crash**: the service is killed (SIGKILL) and started again (what activation does
  on the next call); reported: spawn -> READY (the restore of N servers included),
  the same for an empty registry (the baseline), and whether every server's socket
  answers a Hello afterwards.

    .venv/bin/python benchmarks/restart.py [--servers 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

from dbus_fast.aio import MessageBus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import (
    REPO,
    Children,
    add_server,
    manager_call,
    raw_hello,
    readable,
    start_bus,
    unix_path,
)

from tests.support.wire import decode, driver_call, wire_length


def spawn(bus: str, runtime: str, children: Children, *extra: str) -> tuple[
        subprocess.Popen[bytes], float]:
    """Start ``serve`` in ``runtime``; (process, seconds to READY)."""
    r, w = os.pipe()
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    with open(os.path.join(runtime, f"service-{time.monotonic_ns()}.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xdg_containers", "serve", "--address", bus, "--ready-fd",
             str(w), *extra], pass_fds=(w,), env=env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=log)
    os.close(w)
    children.procs.append(proc)
    try:
        ok = readable(r, 60) and b"READY=1" in os.read(r, 100)
    finally:
        os.close(r)
    if not ok:
        raise SystemExit("the service did not become ready")
    return proc, time.perf_counter() - start


def round_trip(sock: socket.socket, serial: int) -> float:
    """GetId through a live connection; seconds (unrelated messages are skipped)."""
    start = time.perf_counter()
    sock.sendall(driver_call(serial, "GetId"))
    buf = bytearray()
    while True:
        while len(buf) < 16 or len(buf) < wire_length(buf):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        n = wire_length(buf)
        msg = decode(bytes(buf[:n]))
        del buf[:n]
        if msg.reply_serial == serial:
            return time.perf_counter() - start


async def run(args: argparse.Namespace) -> int:
    children = Children()
    try:
        bus = start_bus(children)
        runtime = children.mkdtemp("xdgc-restart-")
        limits = ["--limit", f"max_servers_per_uid={args.servers + 8}",
                  "--limit", f"max_servers={args.servers + 8}"]
        first, _ = spawn(bus, runtime, children, *limits)
        manager = await MessageBus(bus_address=bus).connect()
        servers = [await add_server(manager, "org.benchmark.Echo", str(i))
                   for i in range(args.servers)]
        live = [raw_hello(unix_path(address))[0] for _, address in servers]
        loop = asyncio.get_running_loop()

        # -- hand-over ------------------------------------------------------------
        stop = asyncio.Event()
        worst_call = 0.0
        worst_trip = 0.0

        async def caller() -> None:
            nonlocal worst_call
            while not stop.is_set():
                t = time.perf_counter()
                await manager_call(manager, "GetServerInfo", "o", [servers[0][0]])
                worst_call = max(worst_call, time.perf_counter() - t)

        def tripper() -> None:
            nonlocal worst_trip
            serial = 1000
            while not stop.is_set():
                serial += 1
                worst_trip = max(worst_trip, round_trip(live[0], serial))
                time.sleep(0.002)

        tasks = [asyncio.ensure_future(caller()),
                 loop.run_in_executor(None, tripper)]
        await asyncio.sleep(0.3)
        second, replace_ready = await loop.run_in_executor(
            None, spawn, bus, runtime, children, "--replace", *limits)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        answering = sum(1 for i, s in enumerate(live) if round_trip(s, 5000 + i) >= 0)
        t = time.perf_counter()
        for s in live:
            s.close()
        first.wait(60)
        drain_exit = time.perf_counter() - t

        # -- crash ------------------------------------------------------------------
        os.kill(second.pid, signal.SIGKILL)
        second.wait()
        third, crash_ready = spawn(bus, runtime, children, *limits)
        hellos = 0
        for _, address in servers:
            sock, _name = raw_hello(unix_path(address))
            sock.close()
            hellos += 1
        children.stop(third)
        empty_runtime = children.mkdtemp("xdgc-restart-empty-")
        base, empty_ready = spawn(bus, empty_runtime, children, *limits)
        children.stop(base)
        manager.disconnect()

        n = args.servers
        print(f"servers: {n}, one live connection each")
        print(f"hand-over: serve --replace spawn->READY {replace_ready * 1000:.0f} ms; "
              f"longest manager call during it {worst_call * 1000:.0f} ms; longest GetId "
              f"round trip through an old connection {worst_trip * 1000:.1f} ms; "
              f"{answering}/{n} old connections answer after it; old process exited "
              f"{drain_exit * 1000:.0f} ms after they closed (exit {first.returncode})")
        print(f"crash: restart spawn->READY {crash_ready * 1000:.0f} ms with {n} servers "
              f"restored vs {empty_ready * 1000:.0f} ms empty; {hellos}/{n} sockets answer")
        print(f"SUMMARY servers={n} replace_ready_ms={replace_ready * 1000:.0f} "
              f"held_call_ms={worst_call * 1000:.0f} old_trip_ms={worst_trip * 1000:.1f} "
              f"crash_ready_ms={crash_ready * 1000:.0f} empty_ready_ms={empty_ready * 1000:.0f}")
        return 0
    finally:
        if os.environ.get("RESTART_BENCH_KEEP"):
            children.dirs.clear()
        children.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=100)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
