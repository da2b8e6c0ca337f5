"""SPEC 12: a fault in one connection closes that connection, logged once, and nothing else.

The service runs through tests/integration/fault_service.py, which makes one stage of
the sessions of one server (instance id ``faulty``) raise: the client's SASL, the bus's
SASL, the filter on either side, the handling of the Hello's answer, the write callback,
taking the connection on (accept, Session.start). For each stage: the victim's connection
closes, the service keeps running without spinning, a bystander session on ANOTHER server
keeps round-tripping (and new bystanders keep connecting), and the log has exactly one
error line, with one traceback, for the fault.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import ServiceProcess
from tests.integration.resource_helpers import (
    Bystander,
    cpu_seconds,
    log_lines,
    new_server,
    start_wrapped,
    stop_wrapped,
)
from tests.support.bus import PrivateBus
from tests.support.processes import status_kib, wait_for
from tests.support.rawconn import RawConn
from tests.support.wire import driver_call

pytestmark = pytest.mark.timeout(60)

#: GetId calls whose ~100-byte replies overfill the client's socket buffers.
WRITE_CALLS = 8000
STAGES = [
    "client_sasl",
    "bus_sasl",
    "from_client",
    "from_bus",
    "hello_reply",
    "write",
    "accept",
    "session_start",
]


def poke(address: str, stage: str) -> RawConn:
    """Be a client of the faulty server far enough to reach ``stage``."""
    c = RawConn(address, timeout=5)
    try:
        c.setup()
        if stage == "write":
            # Replies beyond what the socket buffers hold: the service waits for the
            # socket to take more, and its write callback runs once we read.
            calls = b"".join(
                driver_call(c.next_serial(), "GetId") for _ in range(WRITE_CALLS)
            )
            c.send(calls)
            time.sleep(0.5)
        else:
            c.driver("GetId")
    except (OSError, EOFError, ConnectionError, AssertionError, TimeoutError):
        pass  # the fault cut it short: what matters is below
    return c


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_closes_its_connection_only(
    stage: str,
    bus: PrivateBus,
    runtime_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CONTAINERS_TEST_FAULT", stage)
    sp: ServiceProcess = start_wrapped(
        bus.address, runtime_dir, module="tests.integration.fault_service"
    )
    pid = sp.process.pid
    manager = RawConn(bus.address, timeout=10).setup()
    faulty = new_server(manager, "faulty")
    by_address = new_server(manager, "bystander")
    steady = RawConn(by_address).setup()
    bystander = Bystander(by_address).start()
    try:
        wait_for(lambda: len(bystander.latencies) >= 3, "the bystander's first rounds")
        lines_before = len(log_lines(sp))
        cpu_before, t0 = cpu_seconds(pid), time.monotonic()
        victim = poke(faulty, stage)
        try:
            assert victim.wait_eof(5), f"the faulty connection ({stage}) was left open"
        finally:
            victim.close()
        time.sleep(1.0)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu_before
        assert sp.process.poll() is None, f"the service died:\n{sp.log()}"
        peak_kib = status_kib(pid, "VmHWM")
        reply = steady.driver("GetId")
        assert len(reply.body[0]) == 32, reply
        assert bystander.gets_through(0.3), "new bystanders stopped getting through"
        # The faulty server still serves its next client (unless the fault is in every
        # connection's way, as for the stages every connection passes through).
    finally:
        bystander.stop()
        steady.close()
        manager.close()
    new = log_lines(sp)[lines_before:]
    text = "\n".join(new)
    errors = [line for line in new if " ERROR " in line]
    assert len(errors) == 1, f"expected one error line for the fault:\n{text}"
    assert text.count("Traceback (most recent call last)") == 1, text
    assert f"InjectedFault: {stage}" in text, text
    assert "unexpected error in a proxy socket callback" not in text, text
    assert cpu < 0.5 * elapsed, f"service CPU {cpu:.2f} s in {elapsed:.2f} s (busy loop)"
    assert not bystander.errors, bystander.errors[:3]
    assert bystander.worst < 2.0, f"bystander worst round {bystander.worst:.3f} s"
    print(f"\nfault {stage}: bystander worst {bystander.worst * 1000:.0f} ms over "
          f"{len(bystander.latencies)} rounds; service peak RSS {peak_kib // 1024} MiB")
    rc = sp.process.poll()
    stop_wrapped(sp)
    assert rc is None
