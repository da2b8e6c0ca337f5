#!/usr/bin/env python3
"""Live fuzzing: mutated SASL streams and messages thrown at a running service.

Starts a private dbus-daemon and the service (``python -m xdg_containers serve
--address``), creates an unfiltered and a filtered server, puts an echo peer on the bus,
then for ``--seconds`` lets ``--clients`` threads connect through the minted sockets and
send, at random (seeded):

- ``sasl``: a handshake with lines dropped, duplicated, mangled, lower-cased, overlong,
  binary, split at random points, sometimes without the NUL;
- ``message``: a good handshake and Hello, then mutated messages (bit flips, byte edits,
  insertions, deletions, lying length fields, unknown header fields, big-endian), with or
  without fds (declared or not), cut at random points, sometimes a half-close;
- ``flood``: a burst of valid calls and signals, then leave without reading;
- ``stall``: half a handshake or half a message, then leave.

Every second a well-behaved client goes through each server (Hello, GetId, an echo call
carrying an fd). At the end it asserts: the service is alive, its RSS grew less than
``--max-rss-growth-mib`` (VmRSS from /proc/PID/status), its fd count is back to the
baseline, every probe succeeded, the log holds no traceback, and a well-behaved client
still works. Prints one summary line; exits 0 on success, 1 on failure.

    python benchmarks/fuzz_live.py                    # 30 s
    python benchmarks/fuzz_live.py --seconds 600 --clients 8 --seed 7

Only local unix sockets are used.
"""

from __future__ import annotations

import argparse
import array
import itertools
import os
import random
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dbus_fast import MessageType  # noqa: E402

from tests import conftest  # noqa: E402
from tests.conftest import ServiceProcess  # noqa: E402
from tests.support.bus import PrivateBus, started_bus  # noqa: E402
from tests.support.names import DRIVER, EXT  # noqa: E402
from tests.support.processes import fd_count, rss_kib  # noqa: E402
from tests.support.rawconn import RawConn, RawPeer, add_server  # noqa: E402
from tests.support.sasl import opening  # noqa: E402
from tests.support.wire import (  # noqa: E402
    build_message,
    driver_call,
    error_message,
    method_call,
    method_return,
    signal,
    unix_path,
)

ECHO = "org.test.Echo"
FILTERED = {
    EXT + "Filter": ("b", True),
    EXT + "Policy": ("a{ss}", {ECHO: "talk", "org.test.Seen": "see"}),
    EXT + "Call": ("a{sas}", {"org.test.Calls": ["org.test.I.*@/a/*"]}),
}


# ------------------------------------------------------------------------------------------
# processes


def start_service(bus_address: str, extra: list[str], name: str = "fuzz") -> ServiceProcess:
    """``python -m xdg_containers -v serve --address`` with a runtime dir of its own,
    waiting for READY=1 (``stop_service`` removes the dir)."""
    runtime = tempfile.mkdtemp(prefix=f"xdgc-{name}-runtime-")
    os.chmod(runtime, 0o700)
    return conftest.start_service(bus_address, runtime, extra)


def stop_service(svc: ServiceProcess) -> int:
    """Stop the service, remove its runtime dir; its exit status."""
    rc = svc.stop()
    shutil.rmtree(svc.runtime_dir, ignore_errors=True)
    return rc


def finish(svc: ServiceProcess, bus: PrivateBus, failures: list[str], seed: int) -> int:
    """Stop the service and the bus, print the failures (the service log is kept when there
    are any); the exit status of the run."""
    rc = stop_service(svc)
    if rc != 0 and not failures:
        failures.append(f"service exited {rc} on SIGTERM")
    bus.stop()
    if not failures:
        os.unlink(svc.log_path)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    if failures:
        print(f"service log kept at {svc.log_path}; rerun with --seed {seed}", file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------
# mutation


SASL_LINES = [
    b"AUTH EXTERNAL {uid}",
    b"AUTH EXTERNAL",
    b"AUTH",
    b"DATA",
    b"DATA {uid}",
    b"BEGIN",
    b"BEGIN\t",
    b"NEGOTIATE_UNIX_FD",
    b"CANCEL",
    b"ERROR",
    b"auth external {uid}",
    b"begin",
    b"AUTH DBUS_COOKIE_SHA1 {uid}",
    b"AUTH EXTERNAL 30",
    b"DATA zz",
    b"OK x",
    b"",
    b"AUTH EXTERNAL {uid} extra",
    b"\x01\x02",
    "\u00e9".encode(),
]


def sasl_stream(rng: random.Random) -> bytes:
    uid = str(os.getuid()).encode().hex().encode()
    good = [b"AUTH EXTERNAL " + uid, b"NEGOTIATE_UNIX_FD", b"BEGIN"]
    lines = list(good)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        pos = rng.randint(0, len(lines))
        if op < 0.4:
            lines.insert(pos, rng.choice(SASL_LINES).replace(b"{uid}", uid))
        elif op < 0.55 and lines:
            del lines[min(pos, len(lines) - 1)]
        elif op < 0.7 and lines:
            i = min(pos, len(lines) - 1)
            lines[i] = mutate(rng, lines[i], 2)
        elif op < 0.8:
            lines.insert(pos, b"A" * rng.choice([16 * 1024 - 2, 16 * 1024 + 1, 17 * 1024]))
        elif op < 0.9 and lines:
            lines.insert(pos, lines[min(pos, len(lines) - 1)])
        else:
            lines.insert(pos, bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))))
    sep = rng.choice([b"\r\n"] * 8 + [b"\n", b"\r"])
    lead = rng.choice([b"\0"] * 8 + [b"", b"x\0", b"\0\0"])
    data = lead + b"".join(line + sep for line in lines)
    if rng.random() < 0.5:
        data += driver_call(1, "Hello")
    return data


def templates(rng: random.Random, serial: int, little: bool) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return driver_call(
            serial, rng.choice(["GetId", "ListNames", "Hello", "GetNameOwner"]), little=little
        )
    if kind == 1:
        rule = rng.choice(
            [
                "type='signal'",
                "eavesdrop=true",
                "type='signal',eavesdrop='tr''ue'",
                "sender='org.test.Echo'",
                "arg0namespace='org.test'",
                "x",
            ]
        )
        return driver_call(serial, "AddMatch", "s", [rule], little=little)
    if kind == 2:
        return driver_call(
            serial,
            rng.choice(["RequestName", "ReleaseName"]),
            "su",
            [
                rng.choice([ECHO, "org.test.Mine", "org.freedesktop.DBus.Containers1"]),
                rng.randrange(8),
            ],
            little=little,
        )
    if kind == 3:
        return method_call(
            serial,
            rng.choice(
                [
                    ECHO,
                    "org.test.Calls",
                    "org.test.Hidden",
                    "org.freedesktop.DBus.Containers1",
                    ":1.1",
                ]
            ),
            rng.choice(["/", "/a/b", "/org/freedesktop/DBus/Containers1"]),
            rng.choice(["org.test.I", "org.freedesktop.DBus.Containers1", None]),
            rng.choice(["Echo", "AddServer", "GetConnectionInfo", "Stop"]),
            "s",
            ["x" * rng.choice([1, 300, 5000])],
            little=little,
            flags=rng.choice([0, 0, 1, 2, 4]),
        )
    if kind == 4:
        return signal(
            serial,
            rng.choice(["/a", "/org/freedesktop/DBus/Local"]),
            rng.choice(["org.test.S", "org.freedesktop.DBus.Local"]),
            "Sig",
            "u",
            [serial],
            destination=rng.choice([None, ECHO, DRIVER]),
            little=little,
        )
    if kind == 5:
        return method_return(
            serial,
            rng.randint(1, 0xFFFFFFFF),
            rng.choice([ECHO, DRIVER, ":1.1", None]),
            "s",
            ["r"],
            little=little,
        )
    if kind == 6:
        return error_message(
            serial, rng.randint(1, 0xFFFFFFFF), rng.choice([ECHO, None]), "org.test.Error", "e"
        )
    if kind == 7:
        # Unknown header fields, long strings, fields in any order.
        fields: list[tuple[int, str, object]] = [
            (1, "o", "/x"),
            (3, "s", "M"),
            (6, "s", ECHO),
            (2, "s", "org.test.I"),
        ]
        fields += [_unknown(rng, rng.randint(10, 255)) for _ in range(rng.randint(1, 4))]
        rng.shuffle(fields)
        return build_message(1, serial, fields, little=little)
    return driver_call(serial, "GetId", little=little)


def _unknown(rng: random.Random, code: int) -> tuple[int, str, object]:
    sig, value = rng.choice(
        [
            ("s", "y" * rng.randint(200, 600)),
            ("u", 7),
            ("ay", b"\0\1"),
            ("v", ("s", "v")),
            ("as", ["a", "b"]),
            ("g", "a{sv}"),
        ]
    )
    return (code, sig, value)


def mutate(rng: random.Random, data: bytes, n: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n):
        if not buf:
            break
        op = rng.randrange(7)
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4 and len(buf) >= 16:
            at = rng.choice([4, 8, 12])
            buf[at : at + 4] = struct.pack(
                "<I",
                rng.choice([0, 1, 7, 0xFFFFFFFF, 0x7FFFFFF0, rng.randrange(1 << 32), len(buf)]),
            )
        elif op == 5 and len(buf) > 16:
            del buf[rng.randint(16, len(buf)) :]
        else:
            buf[pos] = rng.choice([0, 0xFF, 0x6C, 0x42, 0x2F])
    return bytes(buf)


# ------------------------------------------------------------------------------------------
# clients


def drain(sock: socket.socket, seconds: float) -> str:
    """Read and discard (closing any fds) until EOF or ``seconds`` of quiet."""
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return "open"
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return "open"
        try:
            data, anc, _f, _a = sock.recvmsg(1 << 16, socket.CMSG_SPACE(256 * 4))
        except OSError:
            return "closed"
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % 4])
                for fd in arr:
                    os.close(fd)
        if not data:
            return "closed"


def send_chunks(
    sock: socket.socket, rng: random.Random, data: bytes, fds: list[int] | None = None
) -> None:
    cuts = (
        sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
        if len(data) > 1
        else []
    )
    points = [0, *cuts, len(data)]
    first = True
    for a, b in itertools.pairwise(points):
        chunk = data[a:b]
        if first and fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = sock.sendmsg([chunk], anc)
            if sent < len(chunk):
                sock.sendall(chunk[sent:])
        else:
            sock.sendall(chunk)
        first = False
        if rng.random() < 0.1:
            time.sleep(rng.random() * 0.005)


@dataclass
class Stats:
    cases: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, case: str, outcome: str) -> None:
        with self.lock:
            self.cases[case] += 1
            self.outcomes[outcome] += 1


def one_case(rng: random.Random, address: str) -> tuple[str, str]:
    path = unix_path(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    case = rng.choices(["sasl", "message", "flood", "stall"], [3, 6, 1, 1])[0]
    try:
        sock.connect(path)
        if case == "sasl":
            send_chunks(sock, rng, sasl_stream(rng))
            return case, drain(sock, 0.05)
        fds_on = rng.random() < 0.6
        hello = opening(fds=fds_on) + driver_call(1, "Hello")
        if case == "stall":
            data = hello + templates(rng, 2, True)
            send_chunks(sock, rng, data[: rng.randint(1, len(data) - 1)])
            return case, drain(sock, 0.01)
        sock.sendall(hello)
        if case == "flood":
            burst = b"".join(templates(rng, 2 + i, True) for i in range(rng.randint(50, 400)))
            sock.sendall(burst)
            return case, "left"
        little = rng.random() < 0.7
        for i in range(rng.randint(1, 6)):
            msg = templates(rng, 2 + i, little)
            if rng.random() < 0.8:
                msg = mutate(rng, msg, rng.randint(1, 4))
            fds: list[int] = []
            if rng.random() < 0.2:
                fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(rng.randint(1, 3))]
            try:
                send_chunks(sock, rng, msg, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if rng.random() < 0.2:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return case, drain(sock, 0.05)
    except OSError:
        return case, "closed"  # the service closed first (EPIPE, ECONNRESET)
    finally:
        sock.close()


def probe(address: str) -> float:
    """A well-behaved client: Hello, GetId, an echo call with an fd. Returns seconds."""
    t = time.monotonic()
    with RawConn(address, timeout=5) as c:
        c.setup(fds=True)
        reply = c.driver("GetId")
        if reply.message_type != MessageType.METHOD_RETURN:
            raise AssertionError(f"GetId failed: {reply}")
        r, w = os.pipe()
        try:
            echo = c.call(ECHO, "/", "org.test.I", "Echo", "s", ["probe"], fds=[r])
        finally:
            os.close(r)
            os.close(w)
        if echo.msg.message_type != MessageType.METHOD_RETURN or echo.msg.body != ["probe"]:
            raise AssertionError(f"echo failed: {echo.msg}")
    return time.monotonic() - t


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-rss-growth-mib", type=float, default=40.0)
    ap.add_argument(
        "--limit", action="append", default=[], help="extra --limit NAME=VALUE for the service"
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    extra: list[str] = []
    for lim in args.limit:
        extra += ["--limit", lim]

    bus = started_bus()
    svc = start_service(bus.address, extra)
    os.environ["XDG_RUNTIME_DIR"] = svc.runtime_dir
    failures: list[str] = []
    peer: RawPeer | None = None
    manager: RawConn | None = None
    stats = Stats()
    probes: list[float] = []
    try:
        # Servers outlive their creator, which then leaves: no silent peer stays on the
        # bus for fuzzed calls to wait on.
        manager = RawConn(bus.address, timeout=10).setup()
        keep = {"StopOnDisconnect": ("b", False)}
        addresses = [
            add_server(manager, keep, instance="fuzz-open")[1],
            add_server(manager, {**keep, **FILTERED}, instance="fuzz-filtered")[1],
        ]
        manager.close()
        manager = None
        peer = RawPeer(bus.address, ECHO)
        for address in addresses:
            probes.append(probe(address))
        time.sleep(0.1)
        # The fd baseline: servers, bus connection, peer; no client connected.
        fds0 = fd_count(svc.pid)
        # The RSS baseline after a warm-up (imports, caches, allocator arenas).
        warm = random.Random(seed ^ 0x5A5A)
        for address in addresses:
            for _ in range(30):
                one_case(warm, address)
        time.sleep(0.3)
        rss0 = rss_kib(svc.pid)
        peak = rss0
        deadline = time.monotonic() + args.seconds
        stop = threading.Event()

        def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while not stop.is_set() and time.monotonic() < deadline:
                case, outcome = one_case(rng, rng.choice(addresses))
                stats.count(case, outcome)

        threads = [
            threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        next_probe = time.monotonic()
        while any(t.is_alive() for t in threads):
            if svc.process.poll() is not None:
                failures.append(f"service exited with {svc.process.returncode}")
                stop.set()
                break
            peak = max(peak, rss_kib(svc.pid))
            if time.monotonic() >= next_probe:
                for address in addresses:
                    try:
                        probes.append(probe(address))
                    except Exception as exc:  # every failure is reported
                        failures.append(f"probe through {address}: {exc!r}")
                next_probe = time.monotonic() + 1.0
            time.sleep(0.05)
        for t in threads:
            t.join(10)

        # Settle: every hostile connection is gone; the service is back to its baseline.
        alive = svc.process.poll() is None
        if not alive:
            failures.append(f"service exited with {svc.process.returncode}")
        fds_end = fds0
        rss_end = peak
        if alive:
            # A connection whose client left with calls outstanding is kept until those
            # are answered or HALF_CLOSE_GRACE (25 s) passes: wait past that.
            end = time.monotonic() + 35
            while fd_count(svc.pid) > fds0 and time.monotonic() < end:
                time.sleep(0.1)
            fds_end = fd_count(svc.pid)
            rss_end = rss_kib(svc.pid)
            if fds_end > fds0:
                failures.append(f"fd count {fds_end} > baseline {fds0}")
            grown = (max(peak, rss_end) - rss0) / 1024
            if grown >= args.max_rss_growth_mib:
                failures.append(f"RSS grew by {grown:.1f} MiB")
            for address in addresses:
                try:
                    probes.append(probe(address))
                except Exception as exc:
                    failures.append(f"final probe through {address}: {exc!r}")
        log = svc.log()
        tracebacks = log.count("Traceback (most recent call last)")
        if tracebacks:
            first = log.index("Traceback (most recent call last)")
            failures.append(
                f"{tracebacks} traceback(s) in the service log, first:\n"
                + log[max(0, first - 300) : first + 1500]
            )
        closes = log.count("closing connection")
        total = sum(stats.cases.values())
        print(
            f"fuzz_live: seed={seed} {args.seconds:.0f}s {total} cases "
            f"({', '.join(f'{k}={v}' for k, v in sorted(stats.cases.items()))}); "
            f"outcomes {dict(sorted(stats.outcomes.items()))}; service closed {closes} "
            f"connections with a logged reason; RSS {rss0 / 1024:.1f} -> peak "
            f"{peak / 1024:.1f} -> end {rss_end / 1024:.1f} MiB; fds {fds0} -> {fds_end}; "
            f"probes {len(probes)} ok, slowest {max(probes) * 1000:.0f} ms; "
            f"tracebacks {tracebacks}; peer errors {len(peer.errors) if peer else 0}; "
            f"{'PASS' if not failures else 'FAIL'}"
        )
        if peer is not None and peer.errors:
            print("peer could not read:", peer.errors[:3], file=sys.stderr)
        if peer is not None and peer.died:
            failures.append(f"the echo peer died: {peer.died}")
    finally:
        if peer is not None:
            peer.stop()
        if manager is not None:
            manager.close()
        status = finish(svc, bus, failures, seed)
    return status


if __name__ == "__main__":
    sys.exit(main())
