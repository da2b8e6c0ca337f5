"""Backpressure: a confined client that stops reading cannot grow the service (SPEC §7).

With ``max_pending_bytes_per_connection=262144`` the proxy stops reading the bus side of
a connection whose client is not draining, so the bus (which has its own limits and may
drop messages for a slow reader: its choice) holds the backlog, not us. Meanwhile other
connections keep their latency, and once the slow client reads again every message the
proxy received arrives, in order: nothing is dropped or reordered to stay under the limit.

The floods are several times the RSS bound, so a proxy that buffered them would fail:
without backpressure the service's RSS grows by the whole flood (measured: +48 MiB).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dbus_fast import MessageType

from tests.conftest import ServiceProcess
from tests.support.bus import PrivateBus
from tests.support.processes import rss_kib
from tests.support.rawconn import RawConn, RawPeer, add_server
from tests.support.wire import Received, marshal, method_call, method_return, signal

pytestmark = pytest.mark.timeout(60)

LIMIT = 262144
#: The service's RSS may grow this much while tens of MiB wait for the slow reader.
RSS_BOUND_KIB = 16 * 1024
#: Round trips of other clients during the flood.
LATENCY_BOUND = 2.0  # liveness, not speed: a starved connection would wait forever


@dataclass
class Setup:
    service: ServiceProcess
    bus: PrivateBus
    manager: RawConn
    address: str

    def client(self) -> RawConn:
        return RawConn(self.address, timeout=20).setup()


@pytest.fixture
def setup(service_factory: Any, bus: PrivateBus) -> Iterator[Setup]:
    sp = service_factory("--limit", f"max_pending_bytes_per_connection={LIMIT}")
    manager = RawConn(bus.address, timeout=10).setup()
    _path, address = add_server(manager)
    yield Setup(sp, bus, manager, address)
    manager.close()


class Watch:
    """Samples the service's RSS and another client's round-trip time until stopped."""

    def __init__(self, pid: int, other: RawConn) -> None:
        self.pid = pid
        self.other = other
        self.rss0 = rss_kib(pid)
        self.peak = self.rss0
        self.latencies: list[float] = []

    def sample(self) -> None:
        t = time.monotonic()
        reply = self.other.driver("GetId")
        self.latencies.append(time.monotonic() - t)
        assert reply.message_type == MessageType.METHOD_RETURN
        self.peak = max(self.peak, rss_kib(self.pid))

    def run_while(self, busy: threading.Thread, extra: float) -> None:
        """Sample while ``busy`` runs and ``extra`` seconds after."""
        while busy.is_alive():
            self.sample()
            time.sleep(0.02)
        end = time.monotonic() + extra
        while time.monotonic() < end:
            self.sample()
            time.sleep(0.02)

    def check(self, flood_bytes: int) -> None:
        grown = self.peak - self.rss0
        assert grown < RSS_BOUND_KIB, (
            f"service RSS grew by {grown} KiB while {flood_bytes >> 20} MiB waited for a "
            "reader that does not read"
        )
        assert len(self.latencies) >= 5
        worst = max(self.latencies)
        assert worst < LATENCY_BOUND, f"another client's round trip took {worst:.3f}s"


def test_signal_flood_to_a_client_that_does_not_read(setup: Setup) -> None:
    n, pad = 3000, "x" * 16000
    slow = setup.client()
    other = setup.client()
    flooder = RawConn(setup.bus.address, timeout=20).setup()
    try:
        reply = slow.driver("AddMatch", "s", ["type='signal',interface='org.test.Flood'"])
        assert reply.message_type == MessageType.METHOD_RETURN
        watch = Watch(setup.service.process.pid, other)

        def flood() -> None:
            chunk = bytearray()
            for i in range(n):
                chunk += signal(1000 + i, "/flood", "org.test.Flood", "Tick", "us", [i, pad])
                if len(chunk) > 1 << 20:
                    flooder.send(bytes(chunk))
                    chunk.clear()
            flooder.send(bytes(chunk))
            flooder.driver("GetId")  # the bus has read (and routed) every signal

        emitter = threading.Thread(target=flood)
        emitter.start()
        watch.run_while(emitter, extra=0.5)
        emitter.join()
        watch.check(n * len(pad))

        # The slow client reads again: every signal, in order, none missing.
        seqs: list[int] = []
        while len(seqs) < n:
            r = slow.read_message(10)
            assert r is not None, "the slow client was disconnected"
            if r.msg.member == "Tick":
                seqs.append(r.msg.body[0])
        assert seqs == list(range(n)), "signals lost or reordered"
        assert "closing connection" not in setup.service.log()
    finally:
        for c in (slow, other, flooder):
            c.close()


class BigReplies:
    """Handler answering ``Get(u seq)`` with ``(u seq, ay payload)``; counts replies sent."""

    def __init__(self, payload: int) -> None:
        self.blob = b"\xcd" * payload
        self.sent = 0

    def __call__(self, peer: RawPeer, call: Received) -> list[bytes]:
        (seq,) = call.msg.body
        body = marshal("uay", [seq, self.blob])
        self.sent += 1
        return [
            method_return(peer.reply_serial(), call.msg.serial, call.msg.sender, "uay", body=body)
        ]


def test_pipelined_calls_with_large_replies_all_arrive_in_order(setup: Setup) -> None:
    """The lossless check: N calls pipelined, replies of 448 KiB, the client reads nothing
    for a while; then all N replies arrive, in order, intact."""
    n, payload = 100, 448 * 1024
    replies = BigReplies(payload)
    peer = RawPeer(setup.bus.address, "org.test.Big", replies)
    slow = setup.client()
    other = setup.client()
    try:
        watch = Watch(setup.service.process.pid, other)
        first = slow.serial + 1
        slow.send(
            b"".join(
                method_call(first + i, "org.test.Big", "/", "org.test.Big", "Get", "u", [i])
                for i in range(n)
            )
        )
        slow.serial += n

        def until_all_sent() -> None:
            deadline = time.monotonic() + 15
            while replies.sent < n and time.monotonic() < deadline:
                time.sleep(0.02)

        idle = threading.Thread(target=until_all_sent)
        idle.start()
        watch.run_while(idle, extra=0.7)
        assert replies.sent == n, "the peer could not send every reply"
        watch.check(n * payload)

        i = 0
        while i < n:
            r = slow.read_message(20)
            assert r is not None, "the slow client was disconnected"
            if r.msg.message_type == MessageType.SIGNAL:
                continue  # NameAcquired
            assert r.msg.message_type == MessageType.METHOD_RETURN, r.msg
            assert r.msg.reply_serial == first + i, "replies reordered"
            seq, blob = r.msg.body
            assert seq == i
            assert len(blob) == payload and blob[:1] == b"\xcd" and blob[-1:] == b"\xcd"
            i += 1
        assert len(peer.calls) == n
    finally:
        peer.stop()
        slow.close()
        other.close()


def test_slow_reader_does_not_slow_down_its_own_calls_elsewhere(setup: Setup) -> None:
    """Paused bus side or not, the slow client's own outgoing calls still reach the bus:
    after its backlog drains, a call it made during the pause has its reply waiting."""
    slow = setup.client()
    flooder = RawConn(setup.bus.address, timeout=20).setup()
    try:
        slow.driver("AddMatch", "s", ["type='signal',interface='org.test.Flood'"])
        n = 400
        flooder.send(
            b"".join(
                signal(10 + i, "/f", "org.test.Flood", "Tick", "uay", [i, b"y" * 32768])
                for i in range(n)
            )
        )
        flooder.driver("GetId")
        late = slow.send_call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"
        )
        ticks = 0
        while True:
            r = slow.read_message(10)
            assert r is not None
            if r.msg.member == "Tick":
                assert r.msg.body[0] == ticks
                ticks += 1
            elif r.msg.reply_serial == late:
                break
        assert ticks == n, "the reply overtook signals the bus sent before it"
    finally:
        slow.close()
        flooder.close()
