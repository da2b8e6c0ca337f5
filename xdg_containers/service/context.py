"""The state every service object shares: the bus connection, the registry, the names.

Also the method call being handled (``current_message``), which dbus-fast does not pass
to methods, and the fallback for replies whose fds the caller refuses.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from xdg_containers.policy.tracker import NameTracker
from xdg_containers.servers.registry import ServerRegistry
from xdg_containers.servers.server import ContainerServer
from xdg_containers.servers.server import ServerSession as Session
from xdg_containers.servers.spec import FilterSettings
from xdg_containers.service import errors
from xdg_containers.service.persistence import Persistence
from xdg_containers.service.zygote import AnchorFactory

log = logging.getLogger(__name__)

NAME = "org.freedesktop.DBus.Containers1"
PATH = "/org/freedesktop/DBus/Containers1"
INTERFACE = "org.freedesktop.DBus.Containers1"
SERVER_INTERFACE = "org.freedesktop.DBus.Containers1.Server"
PATH_KEY = "org.freedesktop.DBus.Containers1.Path"
BUS_DRIVER = "org.freedesktop.DBus"
#: between two service processes during ``serve --replace`` (service/handover.py)
HANDOVER_INTERFACE = "org.freedesktop.XdgContainers1.Handover"

_current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "xdg_containers_current_message", default=None
)


def current_message() -> Message:
    """The method call being handled (set by the pre-dispatch handler)."""
    msg = _current_message.get()
    if msg is None:
        raise errors.failed("internal error: no current message")
    return msg


def set_current_message(msg: Message) -> None:
    """Record the call about to be dispatched, for ``current_message``."""
    _current_message.set(msg)


class ServiceContext:
    """Shared state of the service objects: the bus connection, registry, bus address."""

    def __init__(
        self, bus: MessageBus, registry: ServerRegistry, bus_address: str,
        tracker: NameTracker,
        filter_factory: Callable[[Session, FilterSettings], Any] | None = None,
    ) -> None:
        """``bus_address`` is the address of the bus the service itself is on; ``tracker``
        knows which unique names have left it (and calls ``peer_left`` when one does)."""
        self.bus = bus
        self.registry = registry
        self.bus_address = bus_address
        self.tracker = tracker
        self.filter_factory = filter_factory
        #: Starts the anchors of servers created without a Connector (SPEC 10).
        self.anchors = AnchorFactory(asyncio.get_running_loop())
        #: The on-disk registry (the daemon gives it its store once it knows the bus id).
        self.persistence = Persistence(None)
        tracker.on_unique_gone.append(self.peer_left)
        #: The exported object of each live server, by path.
        self.server_objects: dict[str, ServiceInterface] = {}
        self._fd_replies: dict[int, Message] = {}
        #: AddServer calls running (a hand-over waits for them: their servers go along)
        self.adding = 0
        self._added = asyncio.Event()
        self._added.set()
        #: set while calls to our objects wait (``serve --replace`` taking the servers over)
        self.ready = asyncio.Event()
        self.ready.set()
        #: the process we took over from (its late ``Adopt`` calls are accepted)
        self.predecessor: str | None = None

    def add_server_started(self) -> None:
        """An AddServer call began."""
        self.adding += 1
        self._added.clear()

    def add_server_ended(self) -> None:
        """An AddServer call ended (either way)."""
        self.adding -= 1
        if not self.adding:
            self._added.set()

    async def add_servers_done(self) -> None:
        """Until no AddServer call is running."""
        await self._added.wait()

    def service_names(self) -> frozenset[str]:
        """Our well-known and unique names."""
        names = {NAME}
        if self.bus.unique_name:
            names.add(self.bus.unique_name)
        return frozenset(names)

    @staticmethod
    def well_known_name_only() -> frozenset[str]:
        """Our names as seen from another bus: our unique name there is someone else's."""
        return frozenset({NAME})

    async def bus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        """Call a bus-driver method; the reply Message (errors raise DBusError)."""
        reply = await self.bus.call(
            Message(
                destination=BUS_DRIVER,
                path="/org/freedesktop/DBus",
                interface=BUS_DRIVER,
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise DBusError(reply.error_name or errors.FAILED, text)
        return reply

    async def caller_uid(self, sender: str) -> int:
        """The uid the bus reports for a peer."""
        reply = await self.bus_call("GetConnectionUnixUser", "s", [sender])
        return int(reply.body[0])

    async def owner(self, bus_name: str) -> str:
        """The unique name owning ``bus_name``; NameHasNoOwner if nobody does."""
        try:
            reply = await self.bus_call("GetNameOwner", "s", [bus_name])
        except DBusError as exc:
            raise errors.name_has_no_owner(bus_name) from exc
        return str(reply.body[0])

    async def owner_or_none(self, bus_name: str) -> str | None:
        """The unique name owning ``bus_name``, or None."""
        try:
            return await self.owner(bus_name)
        except DBusError:
            return None

    def stop_server(self, server: ContainerServer) -> None:
        """StopServer/Stop: stop listening and close every connection, including those
        the previous process still forwards (it is asked to close them)."""
        if server.adopted and self.predecessor is not None:
            self.bus.send(Message(
                destination=self.predecessor, path=PATH, interface=HANDOVER_INTERFACE,
                member="Stop", signature="o", body=[server.path], flags=0x1))
        server.stop()

    def peer_left(self, name: str) -> None:
        """A unique name left the bus: stop listening on the servers tied to it."""
        for server in self.registry.servers_created_by(name):
            if server.spec.stop_on_disconnect and server.listening:
                log.info("%s: creator %s left the bus; stopping listening", server.path, name)
                server.stop_listening()

    # -- fd replies that a caller may not accept --------------------------------------

    def send_reply_with_fds(self, call: Message, reply: Message, fallback: Message) -> None:
        """Send ``reply``; if the bus refuses its fds, send ``fallback`` instead."""
        reply.serial = self.bus.next_serial()
        self._fd_replies[reply.serial] = fallback
        self.bus.send(reply)
        asyncio.get_running_loop().call_later(30.0, self._fd_replies.pop, reply.serial, None)

    def handle_fd_refusal(self, msg: Message) -> bool:
        """An error answering one of our fd-carrying replies: resend without the fd."""
        if msg.message_type != MessageType.ERROR or msg.reply_serial not in self._fd_replies:
            return False
        fallback = self._fd_replies.pop(msg.reply_serial)
        log.debug("caller refused fds (%s); resending reply without them", msg.error_name)
        self.bus.send(fallback)
        return True
