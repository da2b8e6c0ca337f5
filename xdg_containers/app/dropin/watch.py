"""Questions about the Containers1 service on the session bus, for recovery.py.

``ServiceWatch`` keeps one dbus-fast connection of its own (not the registration's:
that one must stay quiet for the anchor loop) to ask who owns the name, whether that
owner still answers, to activate it, and to hear the name get an owner.
``service_lost`` reads the registration connection's raw bytes for the one notice
routed there (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from xdg_containers.app.dropin.backed import SERVICE
from xdg_containers.wire.header import SIGNAL, MessageError, message_length, parse_header
from xdg_containers.wire.types import SignatureError, read_string

if TYPE_CHECKING:
    from dbus_fast import Message
    from dbus_fast.aio import MessageBus

DRIVER = "org.freedesktop.DBus"
DRIVER_PATH = "/org/freedesktop/DBus"
#: Calls the bus driver answers at once; a Ping to a dead peer answers within the
#: daemon's own reply timeout at worst, but in practice at once (NoReply on its exit).
CALL_TIMEOUT = 5.0
#: dbus-daemon gives up on an activation after 25 s.
ACTIVATION_TIMEOUT = 30.0
OWNER_MATCH = (
    f"type='signal',sender='{DRIVER}',interface='{DRIVER}',member='NameOwnerChanged',"
    f"arg0='{SERVICE}'"
)


def service_lost(data: bytes) -> tuple[bool, int]:
    """Whether ``data`` (messages from the bus) holds NameOwnerChanged saying the service's
    name has no owner any more; and how many bytes of it were whole messages (the rest
    waits for more; all of it when it is no message at all)."""
    pos = 0
    lost = False
    while len(data) - pos >= 16:
        try:
            end = pos + message_length(data[pos:])
            if end > len(data):
                break
            msg, pos = data[pos:end], end
            hdr = parse_header(msg)
            if (
                hdr.message_type != SIGNAL
                or hdr.sender != DRIVER
                or hdr.member != "NameOwnerChanged"
                or hdr.signature != "sss"
            ):
                continue
            at = hdr.body_offset
            name, at = read_string(msg, at, hdr.little_endian)
            _old, at = read_string(msg, at, hdr.little_endian)
            new, at = read_string(msg, at, hdr.little_endian)
        except (MessageError, SignatureError, ValueError):
            return lost, len(data)
        if name == SERVICE and new == "":
            lost = True
    return lost, pos


class ServiceWatch:
    """A session-bus connection asking about the service (made on first use)."""

    def __init__(self, bus_address: str) -> None:
        """Nothing connects until a question is asked."""
        self.bus_address = bus_address
        self.owner_appeared = asyncio.Event()
        self._bus: MessageBus | None = None

    async def _connected(self) -> MessageBus | None:

        from xdg_containers.compat.dbusfast import connect_bus

        if self._bus is not None and self._bus.connected:
            return self._bus
        self.close()
        try:
            bus = await asyncio.wait_for(connect_bus(self.bus_address), CALL_TIMEOUT)
        except Exception:
            return None

        def on_message(msg: Message) -> None:
            if msg.member == "NameOwnerChanged" and msg.sender == DRIVER:
                body = msg.body
                if len(body) == 3 and body[0] == SERVICE and body[2]:
                    self.owner_appeared.set()

        bus.add_message_handler(on_message)
        self._bus = bus
        await self._call(DRIVER, DRIVER_PATH, DRIVER, "AddMatch", "s", [OWNER_MATCH])
        return bus

    async def _call(
        self, dest: str, path: str, interface: str, member: str, sig: str = "",
        body: list[object] | None = None, timeout: float = CALL_TIMEOUT,
    ) -> Message | None:
        """The reply (or error) to one call; None when the bus cannot be asked."""
        from dbus_fast import Message, MessageFlag

        bus = self._bus
        if bus is None:
            return None
        msg = Message(
            destination=dest, path=path, interface=interface, member=member,
            signature=sig, body=body or [],
            flags=MessageFlag.NO_AUTOSTART,
        )
        try:
            return await asyncio.wait_for(bus.call(msg), timeout)
        except Exception:
            return None

    @staticmethod
    def _ok(reply: Message | None) -> bool:
        from dbus_fast import MessageType

        return reply is not None and reply.message_type == MessageType.METHOD_RETURN

    async def owner(self) -> str | None:
        """The unique name owning the service's name; None without one (or no bus)."""
        if await self._connected() is None:
            return None
        reply = await self._call(DRIVER, DRIVER_PATH, DRIVER, "GetNameOwner", "s", [SERVICE])
        return str(reply.body[0]) if reply is not None and self._ok(reply) else None

    async def ping(self, name: str) -> bool:
        """Whether ``name`` answers a Peer Ping (a dead one's pending call fails)."""
        if await self._connected() is None:
            return False
        return self._ok(await self._call(name, "/", "org.freedesktop.DBus.Peer", "Ping"))

    async def activate(self) -> bool:
        """Whether the service's name has an owner, activating it if need be (a service
        started by hand: StartServiceByName fails where no .service file names it)."""
        if await self.owner() is not None:
            return True
        reply = await self._call(DRIVER, DRIVER_PATH, DRIVER, "StartServiceByName", "su",
                                 [SERVICE, 0], timeout=ACTIVATION_TIMEOUT)
        return self._ok(reply)

    def close(self) -> None:
        """Leave the bus."""
        bus, self._bus = self._bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.disconnect()
