"""Shared pieces of the issue-16 service tests: a bystander's round trips and the
service's peak memory, measured while an attack runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from tests.integration.helpers_c1 import driver_call
from tests.support.processes import status_kib

#: A bystander's round trip must stay below this while an attack runs (generous: the
#: machine is shared, and a stalled service shows up as seconds, not milliseconds).
MAX_BYSTANDER_RTT = 2.0


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a process, KiB."""
    return status_kib(pid, "VmHWM")


@dataclass
class Bystander:
    """Round trips (GetId through its own server) of a client of another server."""

    bus: MessageBus
    rtts: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        """The slowest round trip seen (0 when none)."""
        return max(self.rtts, default=0.0)

    def check(self) -> None:
        """Every round trip succeeded, quickly enough, and there were some."""
        assert not self.failures, self.failures
        assert self.rtts, "the bystander made no round trip"
        assert self.worst < MAX_BYSTANDER_RTT, f"bystander round trip {self.worst:.3f} s"


@asynccontextmanager
async def bystander_running(bus: MessageBus, interval: float = 0.01) -> AsyncIterator[Bystander]:
    """Keep ``bus`` (a confined client of another server) making round trips meanwhile."""
    by = Bystander(bus)
    stop = asyncio.Event()

    async def loop() -> None:
        while True:  # at least one round trip, however short the attack
            start = time.monotonic()
            reply = await driver_call(bus, "GetId")
            by.rtts.append(time.monotonic() - start)
            if reply.message_type != MessageType.METHOD_RETURN:
                by.failures.append(f"{reply.error_name}: {reply.body}")
            if stop.is_set():
                return
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(loop())
    try:
        yield by
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def report(finding: str, by: Bystander, pid: int) -> None:
    """One line for the docs' table (seen with ``pytest -s``)."""
    print(
        f"\nMEASURE {finding}: bystander worst rtt {by.worst * 1000:.1f} ms over "
        f"{len(by.rtts)} round trips; service peak RSS {peak_rss_kib(pid)} KiB"
    )
