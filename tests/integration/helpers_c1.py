"""Shared helpers for the Containers1 integration tests (``test_containers1_*.py``).

Everything here talks to the service from outside, as a launcher, a portal or
a confined app would: dbus-fast connections, raw sockets, and child processes
(CLI clients, or a process running as another uid).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from tests.conftest import IFACE, NAME, PATH, call, connect, ok
from tests.support.names import DRIVER, DRIVER_PATH
from tests.support.processes import close_all

SERVER_PREFIX = "/org/freedesktop/DBus/Containers1/c"

#: The named arguments SPEC §3 lists: exactly what SupportedArguments must hold.
SPEC_ARGUMENTS = sorted(
    [
        "StopOnDisconnect",
        "StopOnNotify",
        "org.freedesktop.XdgContainers1.ListenFD",
        "org.freedesktop.XdgContainers1.Filter",
        "org.freedesktop.XdgContainers1.Policy",
        "org.freedesktop.XdgContainers1.Call",
        "org.freedesktop.XdgContainers1.Broadcast",
        "org.freedesktop.XdgContainers1.Log",
        "org.freedesktop.XdgContainers1.Bus",
        "org.freedesktop.XdgContainers1.Connector",
    ]
)

#: upstream's test/data/valid-config-files/limit-containers.conf, in our limit names.
LIMIT_CONTAINERS = (
    "--limit",
    "max_servers_per_uid=3",
    "--limit",
    "max_metadata_bytes=4096",
    "--limit",
    "max_connections_per_server=3",
)
#: upstream's max-containers.conf.
MAX_CONTAINERS = ("--limit", "max_servers=3")


# -- bus calls ---------------------------------------------------------------------------


async def driver_call(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    """Call the bus driver; the reply (success or error)."""
    return await call(
        bus, member, signature, body, destination=DRIVER, path=DRIVER_PATH, interface=DRIVER
    )


async def add_match(bus: MessageBus, rule: str) -> None:
    """AddMatch on the bus driver; fail on error."""
    ok(await driver_call(bus, "AddMatch", "s", [rule]))


async def name_has_owner(bus: MessageBus, name: str) -> bool:
    """NameHasOwner on the bus driver."""
    return bool(ok(await driver_call(bus, "NameHasOwner", "s", [name]))[0])


async def manager(
    bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None
) -> Message:
    """Call a manager method (alias of ``call`` for readability)."""
    return await call(bus, member, signature, body)


def close_fds(reply: Message) -> None:
    """Close the fds a reply carried (ProcessFD, ...)."""
    close_all(reply.unix_fds)


async def list_servers(bus: MessageBus) -> list[str]:
    """ListServers()."""
    return list(ok(await call(bus, "ListServers"))[0])


# -- observing signals and replies, in arrival order ----------------------------------------


@dataclass
class Event:
    """One message seen by an Observer."""

    kind: str  # "removed", "owner", "signal", "reply"
    args: tuple[Any, ...]
    sender: str | None


class Observer:
    """Records, in arrival order on one connection: ServerRemoved, NameOwnerChanged,
    other signals matched later, and every reply (by reply serial).

    A message handler sees messages before dbus-fast resolves a call's future,
    so after ``await call(...)`` everything that arrived before that reply is
    already recorded.
    """

    def __init__(self, bus: MessageBus) -> None:
        """Wrap a connected bus; call ``start()``."""
        self.bus = bus
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    async def start(self) -> Observer:
        """Install the handler and the match rules."""
        self.bus.add_message_handler(self._on_message)
        await add_match(
            self.bus,
            f"type='signal',sender='{NAME}',path='{PATH}',interface='{IFACE}',member='ServerRemoved'",
        )
        await add_match(
            self.bus,
            f"type='signal',sender='{DRIVER}',interface='{DRIVER}',member='NameOwnerChanged'",
        )
        return self

    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "ServerRemoved" and msg.interface == IFACE:
                self.events.append(
                    Event("removed", (msg.body[0], msg.path, msg.signature), msg.sender)
                )
            elif msg.member == "NameOwnerChanged" and msg.sender == DRIVER:
                self.events.append(Event("owner", tuple(msg.body), msg.sender))
            else:
                self.events.append(
                    Event(
                        "signal", (msg.interface, msg.member, msg.path, tuple(msg.body)), msg.sender
                    )
                )
        elif msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            self.events.append(Event("reply", (msg.reply_serial,), msg.sender))
        self._changed.set()
        return None

    def removed(self) -> list[str]:
        """Paths of every ServerRemoved seen, in order (duplicates kept)."""
        return [e.args[0] for e in self.events if e.kind == "removed"]

    def signals(self, interface: str, member: str) -> list[Event]:
        """Other signals seen."""
        return [e for e in self.events if e.kind == "signal" and e.args[:2] == (interface, member)]

    def new_unique_names(self) -> list[str]:
        """Unique names that appeared on the bus while observing."""
        return [
            e.args[0]
            for e in self.events
            if e.kind == "owner" and e.args[0].startswith(":") and e.args[2]
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float = 3.0
    ) -> None:
        """Wait (without sleeping) until ``predicate()`` holds after some message arrived."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_removed(self, path: str, timeout: float = 3.0) -> None:
        """Wait for ServerRemoved(path)."""
        await self.wait_for(lambda: path in self.removed(), f"ServerRemoved({path})", timeout)

    async def wait_name_gone(self, name: str, timeout: float = 3.0) -> None:
        """Wait until ``name`` has no owner (NameOwnerChanged with an empty new owner)."""

        def gone() -> bool:
            return any(
                e.kind == "owner" and e.args[0] == name and not e.args[2] for e in self.events
            )

        if not gone() and not await name_has_owner(self.bus, name):
            return
        await self.wait_for(gone, f"{name} to leave the bus", timeout)

    async def sync(self) -> None:
        """A round trip to the service: whatever it sent us before is now recorded."""
        ok(await call(self.bus, "ListServers"))


@asynccontextmanager
async def observing(address: str) -> AsyncIterator[Observer]:
    """A connection to ``address`` that records ServerRemoved and NameOwnerChanged.

    Test modules wrap this in an ``observer`` fixture.
    """
    conn = await connect(address)
    try:
        yield await Observer(conn).start()
    finally:
        conn.disconnect()


async def wait_disconnected(conn: MessageBus, timeout: float = 3.0) -> None:
    """Wait until the other side closed ``conn`` (EOF and resets count as closed)."""
    try:
        await asyncio.wait_for(conn.wait_for_disconnect(), timeout)
    except (EOFError, OSError):
        pass
    assert not conn.connected


# -- results and sockets ------------------------------------------------------------------


def socket_path_of(results: dict[str, Any]) -> str:
    """The SocketPath result as a str (without its trailing NUL)."""
    raw: bytes = results["SocketPath"].value
    assert raw.endswith(b"\0"), raw
    return os.fsdecode(bytes(raw[:-1]))  # dbus-fast < 5 gives a bytearray


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Poll a local condition (file gone, process exited) with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def recv_until(
    sock: socket.socket, buf: bytes, done: Callable[[bytes], bool], timeout: float = 3.0
) -> bytes:
    """Read from a blocking socket until ``done(buf)``; fail on EOF or timeout."""
    sock.settimeout(timeout)
    while not done(buf):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed; got so far: {buf!r}")
        buf += chunk
    return buf
