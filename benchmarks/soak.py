#!/usr/bin/env python3
"""Soak: many servers, clients coming and going, sequenced calls with fds; nothing lost.

Starts a private dbus-daemon, the service, and a peer (``org.test.Soak``) on the bus.
Creates ``--servers`` long-lived servers (half of them filtered, the peer at ``talk``),
and for ``--seconds`` runs ``--clients`` client threads, each looping: connect through a
random server (fd passing negotiated), Hello, then a random mix, in pipelined windows, of

- ``Seq(t seq, s client)``: the reply must carry the same seq, in call order;
- ``SeqFd(t seq, h fd)``: the fd is a pipe holding ``seq``: the peer reads it back, so the
  right fd travelled with the right message;
- ``GiveFd(t seq) -> (t, h)``: the peer answers with a pipe holding ``seq``;
- ``Burst(t seq, u n)``: the peer sends n unicast signals ``Tick(t seq, u i)`` to the
  client before replying: all n must arrive, in order, before the reply;

then leave (sometimes abruptly, with calls in flight). Serials start anywhere, near 2^32
included, and wrap. A churn thread meanwhile creates servers, uses and stops them.

At the end: zero lost, zero reordered, zero wrong fds, the service's fd count
(/proc/PID/fd) back to its baseline, its RSS (VmRSS) near its baseline and no longer
growing (CPython keeps its high-water mark, so "near" is a bound on the peak working set,
and the leak check is the growth after the first half's peak), only the long-lived
servers left, no traceback in its log. Prints one summary line; exits 0 on success.

    python benchmarks/soak.py                  # 120 s
    python benchmarks/soak.py --seconds 3600 --clients 32 --servers 32

Only local unix sockets are used.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dbus_fast import MessageType  # noqa: E402
from fuzz_live import finish, start_service  # noqa: E402

from tests.support.bus import started_bus  # noqa: E402
from tests.support.names import EXT, MANAGER, MANAGER_PATH  # noqa: E402
from tests.support.processes import fd_count, rss_kib  # noqa: E402
from tests.support.rawconn import RawConn, RawPeer, add_server  # noqa: E402
from tests.support.wire import (  # noqa: E402
    F_DESTINATION,
    F_REPLY_SERIAL,
    F_SIGNATURE,
    F_UNIX_FDS,
    METHOD_RETURN,
    Received,
    build_message,
    marshal,
    method_call,
    method_return,
    signal,
)

PEER = "org.test.Soak"
IFACE = "org.test.Soak"
FILTERED = {EXT + "Filter": ("b", True), EXT + "Policy": ("a{ss}", {PEER: "talk"})}


def _pipe_with(token: str) -> int:
    r, w = os.pipe()
    os.write(w, token.encode())
    os.close(w)
    return r


def _read_token(fd: int) -> str:
    try:
        return os.read(fd, 64).decode()
    finally:
        os.close(fd)


def soak_handler(peer: RawPeer, call: Received) -> list[object] | None:
    msg = call.msg
    member, sender = msg.member, msg.sender
    if sender is None:
        return None
    if member == "Seq":
        seq, cid = msg.body
        return [method_return(peer.reply_serial(), msg.serial, sender, "ts", [seq, cid])]
    if member == "SeqFd":
        seq, _index = msg.body
        token = _read_token(call.fds.pop(0)) if call.fds else "no fd"
        return [method_return(peer.reply_serial(), msg.serial, sender, "ts", [seq, token])]
    if member == "GiveFd":
        (seq,) = msg.body
        reply = build_message(
            METHOD_RETURN,
            peer.reply_serial(),
            [
                (F_REPLY_SERIAL, "u", msg.serial),
                (F_DESTINATION, "s", sender),
                (F_SIGNATURE, "g", "th"),
                (F_UNIX_FDS, "u", 1),
            ],
            marshal("th", [seq, 0]),
        )
        return [(reply, [_pipe_with(str(seq))])]
    if member == "Burst":
        seq, n = msg.body
        out: list[object] = [
            signal(peer.reply_serial(), "/soak", IFACE, "Tick", "tu", [seq, i], destination=sender)
            for i in range(n)
        ]
        out.append(method_return(peer.reply_serial(), msg.serial, sender, "tu", [seq, n]))
        return out
    return [method_return(peer.reply_serial(), msg.serial, sender)]


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **kw: int) -> None:
        with self.lock:
            self.counts.update(kw)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
            self.counts["problems"] += 1


class Client:
    """One confined connection doing sequenced work."""

    def __init__(self, address: str, rng: random.Random, cid: str, tally: Tally) -> None:
        self.rng = rng
        self.cid = cid
        self.tally = tally
        self.conn = RawConn(address, timeout=15)
        self.conn.setup(fds=True)
        # Our own serials, from anywhere (2^32-ish included), wrapping past 0.
        self.serial = rng.choice([1, 1000, 0xFFFFFFF0, rng.randrange(1, 1 << 32)])
        self.seq = 0

    def next_serial(self) -> int:
        self.serial = self.serial % 0xFFFFFFFF + 1
        return self.serial

    def window(self, size: int) -> None:
        """Pipeline ``size`` calls, then read every answer and check it."""
        expected: list[tuple[int, str, int, int]] = []  # (serial, kind, seq, extra)
        data = bytearray()
        fds: list[int] = []
        sends: list[tuple[bytes, list[int]]] = []
        for _ in range(size):
            self.seq += 1
            serial = self.next_serial()
            kind = self.rng.choices(["Seq", "SeqFd", "GiveFd", "Burst"], [5, 2, 1, 1])[0]
            if kind == "Seq":
                msg = method_call(serial, PEER, "/soak", IFACE, "Seq", "ts", [self.seq, self.cid])
                data += msg
                expected.append((serial, kind, self.seq, 0))
            elif kind == "SeqFd":
                if data:
                    sends.append((bytes(data), []))
                    data.clear()
                fd = _pipe_with(str(self.seq))
                fds.append(fd)
                msg = method_call(
                    serial, PEER, "/soak", IFACE, "SeqFd", "th", [self.seq, 0], unix_fds=1
                )
                sends.append((msg, [fd]))
                expected.append((serial, kind, self.seq, 0))
            elif kind == "GiveFd":
                data += method_call(serial, PEER, "/soak", IFACE, "GiveFd", "t", [self.seq])
                expected.append((serial, kind, self.seq, 0))
            else:
                n = self.rng.randint(1, 20)
                data += method_call(serial, PEER, "/soak", IFACE, "Burst", "tu", [self.seq, n])
                expected.append((serial, kind, self.seq, n))
        if data:
            sends.append((bytes(data), []))
        try:
            for chunk, chunk_fds in sends:
                self.conn.send(chunk, chunk_fds)
        finally:
            for fd in fds:
                os.close(fd)
        self.tally.add(calls=size, fds_sent=len(fds))
        self._check(expected)

    def _check(self, expected: list[tuple[int, str, int, int]]) -> None:
        ticks: dict[int, list[int]] = {}
        for serial, kind, seq, extra in expected:
            while True:
                r = self.conn.read_message(15)
                if r is None:
                    self.tally.problem(f"{self.cid}: EOF waiting for serial {serial}")
                    raise EOFError
                m = r.msg
                if m.message_type == MessageType.SIGNAL:
                    r.close_fds()
                    if m.member == "Tick":
                        tseq, i = m.body
                        ticks.setdefault(tseq, []).append(i)
                        self.tally.add(signals=1)
                    continue
                break
            if m.reply_serial != serial:
                self.tally.problem(
                    f"{self.cid}: reply to {m.reply_serial}, expected {serial} "
                    f"({kind}): reordered or lost"
                )
                self.tally.add(reordered=1)
                r.close_fds()
                raise EOFError
            if m.message_type != MessageType.METHOD_RETURN:
                self.tally.problem(f"{self.cid}: {kind} {seq} failed: {m.error_name} {m.body}")
                r.close_fds()
                continue
            if kind == "Seq" and list(m.body) != [seq, self.cid]:
                self.tally.problem(f"{self.cid}: Seq {seq} answered {m.body}")
            elif kind == "SeqFd" and list(m.body) != [seq, str(seq)]:
                self.tally.add(wrong_fds=1)
                self.tally.problem(f"{self.cid}: SeqFd {seq}: peer read {m.body}")
            elif kind == "GiveFd":
                token = _read_token(r.fds.pop(0)) if r.fds else "no fd"
                if token != str(seq) or m.body[0] != seq:
                    self.tally.add(wrong_fds=1)
                    self.tally.problem(f"{self.cid}: GiveFd {seq}: fd held {token!r}")
                else:
                    self.tally.add(fds_received=1)
            elif kind == "Burst":
                got = ticks.pop(seq, [])
                if got != list(range(extra)):
                    self.tally.add(lost_signals=extra - len(got))
                    self.tally.problem(f"{self.cid}: Burst {seq}: ticks {got}, expected {extra}")
            r.close_fds()
            self.tally.add(replies=1)

    def close(self) -> None:
        self.conn.close()


def client_loop(
    addresses: list[str], rng: random.Random, wid: int, tally: Tally, deadline: float
) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        cid = f"w{wid}c{n}"
        try:
            client = Client(rng.choice(addresses), rng, cid, tally)
        except (OSError, ConnectionError, AssertionError) as exc:
            tally.problem(f"{cid}: could not connect: {exc!r}")
            time.sleep(0.1)
            continue
        tally.add(connections=1)
        try:
            for _ in range(rng.randint(1, 8)):
                client.window(rng.randint(1, 12))
            if rng.random() < 0.2:
                # Leave abruptly with calls in flight.
                client.conn.send(
                    method_call(client.next_serial(), PEER, "/soak", IFACE, "Burst", "tu", [0, 50])
                )
                tally.add(abrupt=1)
        except EOFError:
            pass
        except TimeoutError:
            tally.problem(f"{cid}: timed out waiting for a reply (lost?)")
            tally.add(lost=1)
        finally:
            client.close()


def churn_loop(bus_address: str, tally: Tally, deadline: float, rng: random.Random) -> None:
    manager = RawConn(bus_address, timeout=10).setup()
    try:
        while time.monotonic() < deadline:
            named = FILTERED if rng.random() < 0.5 else {}
            path, address = add_server(manager, named, instance=f"churn{rng.randrange(1 << 20)}")
            socket_path = address.split("path=", 1)[1].split(",", 1)[0]
            tally.add(servers_churned=1)
            client = Client(address, rng, f"churn-{path.rsplit('/', 1)[1]}", tally)
            try:
                client.window(5)
            except (EOFError, TimeoutError):
                pass
            stop = manager.call(MANAGER, MANAGER_PATH, MANAGER, "StopServer", "o", [path]).msg
            if stop.message_type != MessageType.METHOD_RETURN:
                tally.problem(f"StopServer {path}: {stop.error_name}")
            if client.conn.wait_eof(5) is False:
                tally.problem(f"{path}: client not disconnected by StopServer")
            client.close()
            if os.path.exists(socket_path):
                tally.problem(f"{path}: socket still exists after StopServer")
            time.sleep(0.05)
    finally:
        manager.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--servers", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=25.0,
        help="RSS at the end may exceed the baseline by this much (CPython keeps its "
        "high-water mark, so this bounds the peak working set)",
    )
    ap.add_argument(
        "--max-late-growth-mib",
        type=float,
        default=8.0,
        help="RSS at the end may exceed the highest RSS of the first half by this much "
        "(the leak check: a leak keeps growing, a working set levels off; allocator "
        "fragmentation alone measured 1-5 MiB here)",
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    bus = started_bus()
    svc = start_service(bus.address, [], "soak")
    os.environ["XDG_RUNTIME_DIR"] = svc.runtime_dir
    tally = Tally()
    failures: list[str] = []
    peer = RawPeer(bus.address, PEER, soak_handler)
    manager = RawConn(bus.address, timeout=10).setup()
    t0 = time.monotonic()
    try:
        addresses = [
            add_server(manager, FILTERED if i % 2 else {}, instance=f"soak{i}")[1]
            for i in range(args.servers)
        ]
        base_servers = sorted(
            manager.call(MANAGER, MANAGER_PATH, MANAGER, "ListServers").msg.body[0]
        )
        # Warm up, then take the baseline.
        warm = Tally()
        for address in addresses:
            c = Client(address, random.Random(seed), "warm", warm)
            c.window(12)
            c.close()
        time.sleep(0.3)
        pid = svc.pid
        rss0, fds0 = rss_kib(pid), fd_count(pid)
        peak = rss0
        deadline = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(addresses, random.Random(seed * 100 + i), i, tally, deadline),
                daemon=True,
            )
            for i in range(args.clients)
        ]
        threads.append(
            threading.Thread(
                target=churn_loop,
                args=(bus.address, tally, deadline, random.Random(seed - 1)),
                daemon=True,
            )
        )
        for t in threads:
            t.start()
        half = time.monotonic() + args.seconds / 2
        peak_first_half = rss0
        trace: list[int] = []
        next_sample = time.monotonic()
        while any(t.is_alive() for t in threads):
            if svc.process.poll() is not None:
                failures.append(f"service exited with {svc.process.returncode}")
                break
            rss = rss_kib(pid)
            peak = max(peak, rss)
            if time.monotonic() < half:
                peak_first_half = peak
            if time.monotonic() >= next_sample:
                trace.append(rss)
                next_sample += args.seconds / 10
            time.sleep(0.1)
        for t in threads:
            t.join(30)

        alive = svc.process.poll() is None
        fds_end, rss_end = fds0, rss0
        if alive:
            end = time.monotonic() + 35  # past HALF_CLOSE_GRACE for abrupt leavers
            while fd_count(pid) > fds0 and time.monotonic() < end:
                time.sleep(0.1)
            fds_end, rss_end = fd_count(pid), rss_kib(pid)
            if fds_end > fds0:
                failures.append(f"leaked fds: {fds_end} open, baseline {fds0}")
            if (rss_end - rss0) / 1024 >= args.max_rss_growth_mib:
                failures.append(f"RSS {rss_end / 1024:.1f} MiB, baseline {rss0 / 1024:.1f} MiB")
            late = (rss_end - peak_first_half) / 1024
            if late >= args.max_late_growth_mib:
                failures.append(
                    f"RSS still growing: {late:.1f} MiB over the first half's peak "
                    f"(trace, MiB: {[round(r / 1024, 1) for r in trace]})"
                )
            servers = sorted(
                manager.call(MANAGER, MANAGER_PATH, MANAGER, "ListServers").msg.body[0]
            )
            if servers != base_servers:
                failures.append(f"servers left: {sorted(set(servers) - set(base_servers))}")
        else:
            failures.append("service died")
        log = svc.log()
        tracebacks = log.count("Traceback (most recent call last)")
        if tracebacks:
            first = log.index("Traceback (most recent call last)")
            failures.append(f"{tracebacks} traceback(s) in the log:\n{log[first : first + 1500]}")
        if peer.died:
            failures.append(f"the peer died: {peer.died}")
        counts = tally.counts
        lost = counts["lost"] + counts["lost_signals"]
        if tally.problems:
            failures.append(f"{len(tally.problems)} problem(s), first: {tally.problems[:5]}")
        elapsed = time.monotonic() - t0
        print(
            f"soak: seed={seed} {args.seconds:.0f}s ({elapsed:.0f}s with set-up and settling), "
            f"{args.servers} servers + {counts['servers_churned']} churned, "
            f"{counts['connections']} connections ({counts['abrupt']} left abruptly), "
            f"{counts['calls']} calls, {counts['replies']} replies, {counts['signals']} signals, "
            f"fds {counts['fds_sent']} sent / {counts['fds_received']} received; "
            f"lost {lost}, reordered {counts['reordered']}, wrong fds {counts['wrong_fds']}; "
            f"service fds {fds0} -> {fds_end}, RSS {rss0 / 1024:.1f} -> peak "
            f"{peak / 1024:.1f} -> end {rss_end / 1024:.1f} MiB (first half's peak "
            f"{peak_first_half / 1024:.1f}; every tenth, MiB: "
            f"{' '.join(f'{r / 1024:.1f}' for r in trace)}); tracebacks {tracebacks}; "
            f"{'PASS' if not failures else 'FAIL'}"
        )
    finally:
        peer.stop()
        manager.close()
        status = finish(svc, bus, failures, seed)
    return status


if __name__ == "__main__":
    sys.exit(main())
