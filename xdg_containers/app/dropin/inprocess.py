"""In-process mode: the groups served by this process with the service's own engine.

Used when the Containers1 service cannot be reached in time, and when ``--log``
is given (its lines then go to this process's stdout, as xdg-dbus-proxy's do).
Each group is a ``ContainerServer`` with no anchor (this process connects to
the bus for its clients, so the bus sees this process, exactly as with
xdg-dbus-proxy), filtered by the same ``PolicyFilter`` on a ``NameTracker`` fed
from the group's own bus.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from xdg_containers.app.dropin.args import Group
from xdg_containers.app.dropin.identity import Identity
from xdg_containers.config import Limits
from xdg_containers.io.dispatch import new_event_loop
from xdg_containers.io.ownerfeed import OwnerChangeFeed
from xdg_containers.io.spare import spares_for
from xdg_containers.policy import policy_from_named_arguments
from xdg_containers.policy.tracker import NameTracker
from xdg_containers.servers.filtering import PolicyFilterFactory
from xdg_containers.servers.registry import ServerRegistry
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.spec import FilterSettings, ServerSpec

log = logging.getLogger("xdg_containers.app.dropin")

SERVICE_NAME = "org.freedesktop.DBus.Containers1"
_SETUP_TIMEOUT = 10.0


def configure_logging(log_messages: bool) -> None:
    """``--log``: every message line (and the engine's notes) on stdout; else warnings
    on stderr."""
    handler: logging.Handler
    root = logging.getLogger("xdg_containers")
    if log_messages:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.setLevel(logging.INFO)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("xdg-containers-dbus-proxy: %(message)s"))
        root.setLevel(logging.WARNING)
    root.addHandler(handler)
    root.propagate = False


async def _sync_names(address: str, tracker: NameTracker) -> None:
    """The current owner of every well-known name (the tracker's start state)."""
    from dbus_fast import Message, MessageType

    from xdg_containers.compat.dbusfast import connect_bus

    bus = await connect_bus(address)
    try:

        async def driver(member: str, sig: str = "", body: list[object] | None = None) -> Message:
            reply = await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member=member,
                    signature=sig,
                    body=body or [],
                )
            )
            assert reply is not None
            return reply

        names = await driver("ListNames")
        for name in names.body[0]:
            if name.startswith(":") or name == "org.freedesktop.DBus":
                continue
            owner = await driver("GetNameOwner", "s", [name])
            if owner.message_type == MessageType.METHOD_RETURN:
                tracker.learn_owner(name, str(owner.body[0]))
    finally:
        bus.disconnect()


class _Bus:
    """What the groups on one bus share: the owner tracker, its feed, the filter factory."""

    def __init__(self) -> None:
        self.tracker = NameTracker()
        self.factory = PolicyFilterFactory(self.tracker)
        self.feed: OwnerChangeFeed | None = None

    async def start(self, address: str) -> None:
        def lost(reason: str) -> None:
            log.warning("lost the name-owner feed of %s: %s", address, reason)

        feed = OwnerChangeFeed(self.tracker, lost)
        try:
            await asyncio.wait_for(feed.start(address), _SETUP_TIMEOUT)
            self.feed = feed
            await asyncio.wait_for(_sync_names(address, self.tracker), _SETUP_TIMEOUT)
        except Exception as exc:
            # Clients of this bus will fail to connect as with xdg-dbus-proxy; the
            # others are served all the same.
            log.warning("cannot watch name owners on %s: %s", address, exc)


class Engine:
    """The service's engine in this process: servers for groups, made on demand.

    Used for the whole life of a drop-in that serves in-process from the start, and
    by recovery.py while the service is away.
    """

    def __init__(self, identity: Identity, loop: asyncio.AbstractEventLoop) -> None:
        """No bus is watched until ``prepare``."""
        self.identity = identity
        self.loop = loop
        self.registry = ServerRegistry(Limits())
        self.buses: dict[str, _Bus] = {}
        self.names = frozenset({SERVICE_NAME})

    async def prepare(self, groups: Sequence[Group]) -> None:
        """Watch the name owners of every bus of ``groups`` not watched yet."""
        new = {g.address: _Bus() for g in groups if g.address not in self.buses}
        self.buses.update(new)
        await asyncio.gather(*(b.start(addr) for addr, b in new.items()))

    def serve(self, group: Group, listener: socket.socket) -> ContainerServer:
        """A server for ``group`` accepting on ``listener`` (which it closes when it stops
        listening); ``prepare`` must have seen the group."""
        policy = None
        if group.filter:
            policy = policy_from_named_arguments(
                group.policy(), group.rules("call"), group.rules("broadcast")
            )
        identity = self.identity
        spec = ServerSpec(
            container_type=identity.container_type,
            app_id=identity.app_id,
            instance_id=identity.instance_id,
            metadata=dict(identity.metadata),
            creator={},
            creator_uid=os.getuid(),
            creator_name="",
            bus_address=group.address,
            stop_on_disconnect=False,
            log_messages=group.log,
            filter=FilterSettings(group.filter, policy),
        )
        names = self.names
        server = ContainerServer(
            spec, self.registry.allocate_path(), self.registry, lambda: names,
            self.buses[group.address].factory, self.loop,
        )
        server.listen_on(listener)
        self.registry.add(server)
        return server

    def close(self) -> None:
        """Stop every server (their connections too) and the name-owner feeds."""
        spares_for(self.loop).close()
        for server in self.registry:
            server.stop()
        for b in self.buses.values():
            if b.feed is not None:
                b.feed.close()


async def serve(
    groups: Sequence[Group],
    listeners: Sequence[socket.socket],
    identity: Identity,
    sync_fd: int | None,
) -> int:
    """Serve every group on its listening socket until the sync fd's reader is gone."""
    loop = asyncio.get_running_loop()
    engine = Engine(identity, loop)
    await engine.prepare(groups)
    for group, listener in zip(groups, listeners, strict=True):
        engine.serve(group, listener)
    stop = asyncio.Event()
    if sync_fd is not None:
        # A pipe's write end: its reader going away is EPOLLERR, seen as readable.
        loop.add_reader(sync_fd, stop.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if sync_fd is not None:
        loop.remove_reader(sync_fd)
    engine.close()
    return 0


def run(
    groups: Sequence[Group],
    listeners: Sequence[socket.socket],
    identity: Identity,
    sync_fd: int | None,
) -> int:
    """``serve`` on the service's dispatching event loop."""
    configure_logging(any(g.log for g in groups))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(groups, listeners, identity, sync_fd))
