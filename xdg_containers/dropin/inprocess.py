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

from ..config import Limits
from ..filtering import PolicyFilterFactory
from ..ownerfeed import OwnerChangeFeed
from ..policy import policy_from_named_arguments
from ..policy.tracker import NameTracker
from ..proxy.dispatch import new_event_loop
from ..proxy.spare import spares_for
from ..servers.registry import SERVER_PATH_PREFIX, ServerRegistry
from ..servers.server import ContainerServer, FilterSettings, ServerSpec
from .args import Group
from .identity import Identity

log = logging.getLogger("xdg_containers.dropin")

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

    from ..compat.dbusfast import connect_bus

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


async def serve(
    groups: Sequence[Group],
    listeners: Sequence[socket.socket],
    identity: Identity,
    sync_fd: int | None,
) -> int:
    """Serve every group on its listening socket until the sync fd's reader is gone."""
    loop = asyncio.get_running_loop()
    registry = ServerRegistry(Limits())
    buses: dict[str, _Bus] = {}
    for group in groups:
        if group.address not in buses:
            buses[group.address] = _Bus()
    await asyncio.gather(*(b.start(addr) for addr, b in buses.items()))
    names = frozenset({SERVICE_NAME})
    for i, (group, listener) in enumerate(zip(groups, listeners, strict=True)):
        policy = None
        if group.filter:
            policy = policy_from_named_arguments(
                group.policy(), group.rules("call"), group.rules("broadcast")
            )
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
        server = ContainerServer(
            spec, f"{SERVER_PATH_PREFIX}{i}", registry, lambda: names,
            buses[group.address].factory, loop,
        )
        server.listen_on(listener)
        registry.add(server)
    stop = asyncio.Event()
    if sync_fd is not None:
        # A pipe's write end: its reader going away is EPOLLERR, seen as readable.
        loop.add_reader(sync_fd, stop.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if sync_fd is not None:
        loop.remove_reader(sync_fd)
    spares_for(loop).close()
    for server in registry:
        server.stop()
    for b in buses.values():
        if b.feed is not None:
            b.feed.close()
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
