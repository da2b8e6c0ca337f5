#!/usr/bin/env python3
"""Time to a usable socket: AddServer -> first Hello reply, vs spawning xdg-dbus-proxy.

Both sides are what a launcher does to give one app instance a filtered bus
(policy: talk to one name), measured until a client got its Hello reply:

- ours: on a running service, ``AddServer`` (Filter + Policy {NAME: talk}) from a
  connected manager, then connect to the returned address, SASL EXTERNAL, Hello;
- xdg-dbus-proxy: spawn ``xdg-dbus-proxy --fd=W BUS SOCKET --filter --talk=NAME``,
  wait for its sync byte on the pipe (what flatpak does), then connect, SASL, Hello.

The client is a raw socket (no D-Bus library), the same code for both. The two
are interleaved (alternating which goes first) and the median of ``--runs`` is
reported, with the split (AddServer reply / spawn+sync byte, then Hello). Not
timed: StopServer of our server and the teardown of each xdg-dbus-proxy.

``--cold K`` also times K cold starts of our service (spawn ``python -m
xdg_containers serve`` -> READY -> AddServer -> Hello): the cost when the
service is not running yet, paid once per session (D-Bus activation).

Prints a table and one ``SUMMARY`` line; the ratio is ours/xdg-dbus-proxy
(< 1.00: ours is faster). Needs dbus-daemon and xdg-dbus-proxy; run with the
project's venv python (dbus-fast):

    .venv/bin/python benchmarks/startup.py [--runs 50] [--cold 5]

This module also holds the small helpers ``scale.py`` uses (private bus with
raised connection limits, raw Hello client, service and xdg-dbus-proxy start,
/proc memory readings).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.bus import PrivateBus  # noqa: E402
from tests.support.processes import close_all, stop_all  # noqa: E402
from tests.support.sasl import BEGIN, authenticate  # noqa: E402
from tests.support.wire import decode, driver_call, wire_length  # noqa: E402

EXT = "org.freedesktop.XdgContainers1."
MANAGER = "org.freedesktop.DBus.Containers1"
MANAGER_PATH = "/org/freedesktop/DBus/Containers1"
TALK_NAME = "org.benchmark.Echo"

# -- processes ------------------------------------------------------------------------


@dataclass
class Children:
    """Processes we started (stopped by pid at exit) and temp dirs we made."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def mkdtemp(self, prefix: str) -> str:
        d = tempfile.mkdtemp(prefix=prefix)
        os.chmod(d, 0o700)
        self.dirs.append(d)
        return d

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM one child we started, SIGKILL if it lingers; reap it."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def cleanup(self) -> None:
        close_all(self.fds)
        self.fds.clear()
        stop_all(self.procs)
        self.procs.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


#: dbus-daemon limits raised for thousands of connections.
BUS_LIMITS = {
    "max_incomplete_connections": 10000,
    "max_completed_connections": 100000,
    "max_connections_per_user": 100000,
    "max_match_rules_per_connection": 50000,
    "max_replies_per_connection": 50000,
    "auth_timeout": 240000,
}


def start_bus(children: Children) -> str:
    """A private dbus-daemon (tests/support/bus.py) with BUS_LIMITS, stopped at cleanup."""
    bus = PrivateBus(limits=BUS_LIMITS)
    address = bus.start()
    assert bus.process is not None
    children.procs.append(bus.process)
    children.dirs.append(bus.tmpdir)
    return address


def readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable (or hung up); poll, as fds may be >= 1024."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def raise_fd_limit(want: int) -> int:
    """Raise our soft RLIMIT_NOFILE (children inherit it); return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = soft if soft >= want else (want if hard == resource.RLIM_INFINITY else min(want, hard))
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def start_service(
    bus_address: str,
    children: Children,
    limits: dict[str, int] | None = None,
    python: str = sys.executable,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """``python -m xdg_containers serve --address BUS`` in a fresh runtime dir; wait for READY."""
    runtime = children.mkdtemp("xdgc-bench-runtime-")
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=runtime,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    r, w = os.pipe()
    argv = [python, "-m", "xdg_containers", "serve", "--address", bus_address, "--ready-fd", str(w)]
    for k, v in (limits or {}).items():
        argv += ["--limit", f"{k}={v}"]
    proc = subprocess.Popen(
        argv,
        pass_fds=(w,),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    children.procs.append(proc)
    try:
        data = os.read(r, 100) if readable(r, timeout) else b""
    finally:
        os.close(r)
    if b"READY=1" not in data:
        raise SystemExit("the service did not become ready (is dbus-fast importable?)")
    return proc


@dataclass
class XdgProxy:
    """One xdg-dbus-proxy process, alive while we hold the read end of its sync pipe."""

    proc: subprocess.Popen[bytes]
    sync_fd: int
    socket_path: str


def spawn_xdg_dbus_proxy(
    bus_address: str, socket_path: str, talk: str, timeout: float = 10.0
) -> XdgProxy:
    """Spawn ``xdg-dbus-proxy --fd=W BUS SOCKET --filter --talk=NAME`` and wait for its byte."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            ["xdg-dbus-proxy", f"--fd={w}", bus_address, socket_path, "--filter", f"--talk={talk}"],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(w)
    if not readable(r, timeout) or os.read(r, 1) == b"":
        os.close(r)
        proc.kill()
        proc.wait()
        raise SystemExit("xdg-dbus-proxy did not signal readiness")
    return XdgProxy(proc, r, socket_path)


def stop_xdg_dbus_proxy(xp: XdgProxy) -> None:
    """Close its sync pipe (it exits on that), make sure, reap."""
    try:
        os.close(xp.sync_fd)
    except OSError:
        pass
    if xp.proc.poll() is None:
        xp.proc.terminate()
    try:
        xp.proc.wait(5)
    except subprocess.TimeoutExpired:
        xp.proc.kill()
        xp.proc.wait()


# -- a raw D-Bus client: SASL EXTERNAL + Hello, nothing else ---------------------------


HELLO = driver_call(1, "Hello")


def unix_path(address: str) -> str:
    """The socket path of a ``unix:path=...`` address."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        for kv in params.split(","):
            k, _, v = kv.partition("=")
            if k == "path":
                return unquote_to_bytes(v).decode()
    raise ValueError(f"no unix:path in {address!r}")


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> None:
    while len(buf) < n:
        chunk = sock.recv(max(4096, n - len(buf)))
        if not chunk:
            raise ConnectionError("connection closed before the Hello reply")
        buf += chunk


def raw_hello(path: str, timeout: float = 10.0) -> tuple[socket.socket, str]:
    """Connect, authenticate (EXTERNAL), say Hello; return the socket and our unique name.

    Anything after the Hello reply (NameAcquired, ...) stays unread in the socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        authenticate(sock, begin=False)
        sock.sendall(BEGIN + HELLO)
        buf = bytearray()
        _recv_exact(sock, 16, buf)
        _recv_exact(sock, wire_length(buf), buf)
        reply = decode(bytes(buf[: wire_length(buf)]))
        if reply.message_type != MessageType.METHOD_RETURN:
            raise ConnectionError(f"Hello answered with {reply.message_type.name}")
        return sock, str(reply.body[0])
    except BaseException:
        sock.close()
        raise


# -- manager calls ---------------------------------------------------------------------


async def manager_call(
    manager: MessageBus, member: str, signature: str, body: list[Any]
) -> list[Any]:
    """Call the Containers1 manager; the reply's body (exit naming the error otherwise)."""
    msg = Message(destination=MANAGER, path=MANAGER_PATH, interface=MANAGER, member=member,
                  signature=signature, body=body)
    reply = await manager.call(msg)
    assert reply is not None
    if reply.message_type != MessageType.METHOD_RETURN:
        raise SystemExit(f"{member} failed: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def add_server(manager: MessageBus, talk: str, instance: str = "1") -> tuple[str, str]:
    """AddServer(Filter, Policy {talk: talk}); return (object path, address)."""
    named = {EXT + "Filter": Variant("b", True), EXT + "Policy": Variant("a{ss}", {talk: "talk"})}
    body = ["org.benchmark", "org.benchmark.App", instance, {}, named]
    path, results = await manager_call(manager, "AddServer", "sssa{sv}a{sv}", body)
    return str(path), str(results["Address"].value)


async def stop_server(manager: MessageBus, path: str) -> None:
    """StopServer."""
    await manager_call(manager, "StopServer", "o", [path])


# -- memory ----------------------------------------------------------------------------


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup (VmRSS if absent)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
        return rss, pss
    except OSError:
        pass
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, rss


# -- the benchmark ---------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def run(args: argparse.Namespace) -> int:
    children = Children()
    manager: MessageBus | None = None
    try:
        bus = start_bus(children)
        service = start_service(bus, children, python=args.python)
        manager = await MessageBus(bus_address=bus).connect()
        xdg_dir = children.mkdtemp("xdgc-bench-xdp-")
        ours: list[tuple[float, float]] = []  # (total, AddServer reply)
        theirs: list[tuple[float, float]] = []  # (total, spawn + sync byte)
        deadline = time.monotonic() + args.budget

        async def one_ours(record: bool) -> None:
            t0 = time.perf_counter()
            path, address = await add_server(manager, args.talk)
            t1 = time.perf_counter()
            sock, _name = raw_hello(unix_path(address))
            t2 = time.perf_counter()
            sock.close()
            await stop_server(manager, path)
            if record:
                ours.append((t2 - t0, t1 - t0))

        def one_theirs(i: int, record: bool) -> None:
            sock_path = os.path.join(xdg_dir, f"bus-{i}")
            t0 = time.perf_counter()
            xp = spawn_xdg_dbus_proxy(bus, sock_path, args.talk)
            t1 = time.perf_counter()
            sock, _name = raw_hello(sock_path)
            t2 = time.perf_counter()
            sock.close()
            stop_xdg_dbus_proxy(xp)
            try:
                os.unlink(sock_path)
            except OSError:
                pass
            if record:
                theirs.append((t2 - t0, t1 - t0))

        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            if record and i > args.warmup + 5 and time.monotonic() > deadline:
                print(
                    f"# budget of {args.budget:.0f} s used up after {len(ours)} runs",
                    file=sys.stderr,
                )
                break
            if i % 2:
                await one_ours(record)
                one_theirs(i, record)
            else:
                one_theirs(i, record)
                await one_ours(record)
            await asyncio.sleep(args.pause)

        cold: list[tuple[float, float]] = []  # (total, spawn -> READY)
        if args.cold:
            children.stop(service)
            for _ in range(args.cold):
                t0 = time.perf_counter()
                svc = start_service(bus, children, python=args.python)
                t1 = time.perf_counter()
                _path, address = await add_server(manager, args.talk)
                sock, _name = raw_hello(unix_path(address))
                t2 = time.perf_counter()
                sock.close()
                cold.append((t2 - t0, t1 - t0))
                children.stop(svc)

        med = statistics.median
        n = len(ours)
        print(
            f"startup: {n} interleaved runs (after {args.warmup} warm-up), filtered, "
            f"policy talk {args.talk}; times in ms\n"
        )
        header = f"{'path':<44}{'median':>8}{'p10':>8}{'p90':>8}   split (median)"
        print(header)
        print("-" * (len(header) + 30))
        o_tot = [t for t, _ in ours]
        x_tot = [t for t, _ in theirs]
        o_add = med(a for _, a in ours)
        x_spawn = med(a for _, a in theirs)
        print(
            f"{'ours: AddServer -> Hello reply':<44}{fmt_ms(med(o_tot)):>8}"
            f"{fmt_ms(pct(o_tot, 0.1)):>8}{fmt_ms(pct(o_tot, 0.9)):>8}"
            f"   AddServer reply {fmt_ms(o_add)}, connect+SASL+Hello "
            f"{fmt_ms(med(t - a for t, a in ours))}"
        )
        print(
            f"{'xdg-dbus-proxy: spawn+sync byte -> Hello':<44}{fmt_ms(med(x_tot)):>8}"
            f"{fmt_ms(pct(x_tot, 0.1)):>8}{fmt_ms(pct(x_tot, 0.9)):>8}"
            f"   spawn+sync byte {fmt_ms(x_spawn)}, connect+SASL+Hello "
            f"{fmt_ms(med(t - a for t, a in theirs))}"
        )
        if cold:
            c_tot = [t for t, _ in cold]
            print(
                f"{'ours cold: spawn service -> READY -> ... ':<44}{fmt_ms(med(c_tot)):>8}"
                f"{fmt_ms(pct(c_tot, 0.1)):>8}{fmt_ms(pct(c_tot, 0.9)):>8}"
                f"   spawn -> READY {fmt_ms(med(s for _, s in cold))} (n={len(cold)})"
            )
        ratio = med(o_tot) / med(x_tot)
        print()
        summary = (
            f"SUMMARY startup n={n} median ms: ours AddServer->Hello {fmt_ms(med(o_tot))}"
            f" | xdg-dbus-proxy spawn+sync->Hello {fmt_ms(med(x_tot))}"
            f" | ratio ours/xdg={ratio:.2f} (<1.00: ours faster, x{1 / ratio:.1f})"
        )
        if cold:
            c = med(t for t, _ in cold)
            summary += f" | ours cold service start {fmt_ms(c)} (={c / med(x_tot):.1f}x xdg)"
        print(summary)
        return 0
    finally:
        if manager is not None:
            manager.disconnect()
        children.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="measured runs per side [50]")
    parser.add_argument("--warmup", type=int, default=5, help="unrecorded runs first [5]")
    parser.add_argument(
        "--cold", type=int, default=5, help="cold starts of our service to time, 0 for none [5]"
    )
    parser.add_argument("--talk", default=TALK_NAME, help=f"policy talk name [{TALK_NAME}]")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.02,
        help="seconds between runs, to let teardown settle [0.02]",
    )
    parser.add_argument(
        "--budget", type=float, default=60.0, help="stop starting runs after this many seconds [60]"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the service [this one]"
    )
    args = parser.parse_args()
    if shutil.which("xdg-dbus-proxy") is None:
        raise SystemExit("xdg-dbus-proxy not found (apt-get install xdg-dbus-proxy)")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
