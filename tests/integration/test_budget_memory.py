"""SPEC 12, memory: the service-wide ``max_buffered_bytes`` budget.

A header claiming a 127 MiB body followed by 64 MiB and a stall made the original code
reserve the whole 127 MiB for that connection; 16 such connections over 4 servers held
2 GiB (and more servers the OOM killer's attention). With the budget, the connections
holding the most stop being read once the service holds ``max_buffered_bytes``; the ones
whose message then makes no progress are closed by ``idle_partial_message_timeout``; no
message is dropped, and a bystander on a fifth server is served all along.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.conftest import ServiceProcess
from tests.integration.resource_helpers import Bystander, new_server, reset_peak_rss
from tests.integration.test_hostile_attacks import claiming_header
from tests.support.bus import PrivateBus
from tests.support.processes import status_kib, wait_for
from tests.support.rawconn import RawConn
from tests.support.wire import method_call

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def stall_after(conns: list[RawConn], claim: int, send: int) -> list[threading.Thread]:
    """Each connection sends a header claiming ``claim`` bytes and ``send`` bytes of its
    body (blocking while the service does not read), then stalls."""
    payload = claiming_header(claim) + b"\xab" * send

    def push(c: RawConn) -> None:
        try:
            c.sock.settimeout(60)
            c.sock.sendall(payload)
        except OSError:
            pass  # closed or still paused when the test ends

    threads = [threading.Thread(target=push, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    return threads


def test_stalled_giant_messages_stay_within_max_buffered_bytes(
    service_factory: Any, bus: PrivateBus
) -> None:
    """Default config: 16 connections over 4 servers each claim 127 MiB, send 64 MiB and
    stall. The service's RSS grows by less than 768 MiB (512 MiB budget plus one message
    in flight); a bystander on a 5th server keeps connecting and round-tripping."""
    sp: ServiceProcess = service_factory()
    pid = sp.process.pid
    manager = RawConn(bus.address, timeout=10).setup()
    attack = [new_server(manager, f"attacker-{i}") for i in range(4)]
    bystander = Bystander(new_server(manager, "bystander")).start()
    conns: list[RawConn] = []
    try:
        wait_for(lambda: len(bystander.latencies) >= 3, "the bystander's first rounds")
        rss_before = status_kib(pid, "VmRSS")
        reset_peak_rss(pid)
        conns = [RawConn(a, timeout=30).setup() for a in attack for _ in range(4)]
        threads = stall_after(conns, 127 * MiB, 64 * MiB)
        # Until every push finished or the service stopped taking more (paused).
        last, still = -1, 0
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.5)
            rss = status_kib(pid, "VmRSS")
            still = still + 1 if abs(rss - last) < 2048 else 0
            last = rss
            if still >= 6:
                break
        peak = status_kib(pid, "VmHWM") - rss_before
        assert bystander.gets_through(0.5), "the bystander stopped getting through"
        for c in conns:
            assert c.still_open(0.01), "a connection was dropped to stay under the budget"
    finally:
        bystander.stop()
        for c in conns:
            c.close()
        manager.close()
    print(f"\nmemory: service peak RSS growth {peak // 1024} MiB; bystander worst "
          f"{bystander.worst * 1000:.0f} ms over {len(bystander.latencies)} rounds")
    assert peak < 768 * 1024, f"the service's RSS grew by {peak // 1024} MiB"
    assert not bystander.errors, bystander.errors[:3]
    assert bystander.worst < 2.0, f"bystander worst round {bystander.worst:.3f} s"
    assert "over max_buffered_bytes (512 MiB)" in sp.log()


def test_stalled_holders_are_closed_and_a_paused_message_still_arrives_whole(
    service_factory: Any, bus: PrivateBus
) -> None:
    """A 48 MiB budget: 4 stalled giants over 2 servers fill it and are closed after
    the idle timeout (they made no progress of their own); a client of a 3rd server that
    sends a whole 24 MiB message meanwhile is paused, not dropped: the bus gets it."""
    sp: ServiceProcess = service_factory(
        "--limit", f"max_buffered_bytes={48 * MiB}",
        "--limit", "idle_partial_message_timeout=2000",
    )
    manager = RawConn(bus.address, timeout=10).setup()
    attack = [new_server(manager, f"attacker-{i}") for i in range(2)]
    address = new_server(manager, "bystander")
    giants = [RawConn(a, timeout=30).setup() for a in attack for _ in range(2)]
    honest = RawConn(address, timeout=30).setup()
    try:
        stall_after(giants, 100 * MiB, 30 * MiB)
        sp.wait_for_log("over max_buffered_bytes", timeout=20)
        call = method_call(5, "org.test.Nobody", "/", "org.test.I", "M", "ay",
                           [b"\xcd" * (24 * MiB)])
        sender = threading.Thread(target=honest.send, args=(call,), daemon=True)
        sender.start()
        for g in giants:
            assert g.wait_eof(20), "a stalled giant outlived idle_partial_message_timeout"
        reply = honest.read_reply(5, timeout=30)
        assert reply.msg.error_name == "org.freedesktop.DBus.Error.ServiceUnknown", reply.msg
        sender.join(5)
        with RawConn(address).setup() as c:
            assert len(c.driver("GetId").body[0]) == 32
    finally:
        for g in giants:
            g.close()
        honest.close()
        manager.close()
    assert sp.log().count("was left unfinished") == 4
