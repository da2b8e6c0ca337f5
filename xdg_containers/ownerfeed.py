"""The service-wide NameOwnerChanged feed, on a bus connection of its own, read raw.

The bus broadcasts NameOwnerChanged for every connection that comes or goes,
ours or not: two per proxied client, and a steady stream on a busy desktop
bus. Through dbus-fast each costs a full unmarshal, a Message and an asyncio
iteration (~27 µs); here a dedicated connection is read like the proxied
sockets (inline from epoll_wait, header shapes cached) and only the three
strings are decoded (~5 µs). The service's dbus-fast connection then carries
only its own calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from .policy.tracker import NameTracker
from .proxy.endpoint import ConnectError, Endpoint, close_fds, connect_address
from .sasl.client import SaslClient
from .sasl.server import SaslError
from .wire.build import BUS_NAME, bus_call, error_reply
from .wire.framing import MessageReader
from .wire.header import (
    ERROR,
    SIGNAL,
    SPEC_MAX_MESSAGE_BYTES,
    MessageError,
    parse_header,
)
from .wire.types import SignatureError, read_string

log = logging.getLogger(__name__)

NAME_OWNER_CHANGED_RULE = (
    "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    "interface='org.freedesktop.DBus',member='NameOwnerChanged'"
)
_HELLO_SERIAL = 1
_ADD_MATCH_SERIAL = 2
_SETUP_TIMEOUT = 30.0
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"


class FeedError(Exception):
    """The feed could not be set up (the message says why)."""


class OwnerChangeFeed:
    """Feeds a NameTracker from its own subscription; ``on_lost`` runs if the bus goes."""

    def __init__(self, tracker: NameTracker, on_lost: Callable[[str], None]) -> None:
        """Nothing happens until ``start``."""
        self.tracker = tracker
        self.on_lost = on_lost
        self.unique_name: str | None = None
        self._endpoint: Endpoint | None = None
        # Any peer may send this connection anything the bus lets through: a smaller
        # limit would let one large message end the service.
        self._reader = MessageReader(SPEC_MAX_MESSAGE_BYTES)
        self._closed = False
        self._serial = _ADD_MATCH_SERIAL

    async def start(self, bus_address: str) -> None:
        """Connect, authenticate, Hello, subscribe; return once the bus took the match rule."""
        loop = asyncio.get_running_loop()
        try:
            sock = await connect_address(loop, bus_address)
        except ConnectError as exc:
            raise FeedError(str(exc)) from exc
        try:
            await asyncio.wait_for(self._handshake(loop, sock), _SETUP_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        # Served after proxied sockets that are ready at the same time: the bus sends
        # a newcomer's NameOwnerChanged just before its Hello reply.
        self._endpoint = Endpoint(loop, sock, self._data, self._lost, self._eof, later=True)
        self._endpoint.start_reading()
        # Signals that arrived with the AddMatch reply are already in the reader.
        self._pump()

    async def _handshake(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        sasl = SaslClient(os.getuid())
        # All pipelined: the bus reads AUTH, BEGIN and the messages in order.
        await loop.sock_sendall(
            sock,
            sasl.start()
            + sasl.begin(False)
            + bus_call(_HELLO_SERIAL, "Hello")
            + bus_call(_ADD_MATCH_SERIAL, "AddMatch", arg=NAME_OWNER_CHANGED_RULE),
        )
        while not sasl.done:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise FeedError("the bus closed the connection during authentication")
            try:
                sasl.feed(data)
            except SaslError as exc:
                raise FeedError(f"bus authentication failed: {exc}") from exc
        reader = self._reader
        if sasl.leftover:
            reader.feed(sasl.leftover)
        while True:
            item = reader.next_message()
            if item is None:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise FeedError("the bus closed the connection before the subscription")
                reader.feed(data)
                continue
            hdr = parse_header(item[0])
            rs = hdr.reply_serial
            if hdr.sender != BUS_NAME or rs not in (_HELLO_SERIAL, _ADD_MATCH_SERIAL):
                self._handle(item[0])
            elif hdr.message_type == ERROR:
                what = "Hello" if rs == _HELLO_SERIAL else "AddMatch"
                raise FeedError(f"the bus refused {what}: {hdr.error_name}")
            elif rs == _HELLO_SERIAL:
                self.unique_name = read_string(item[0], hdr.body_offset, hdr.little_endian)[0]
            else:
                return  # subscribed

    def _data(self, data: bytes, fds: list[int]) -> None:
        close_fds(fds)  # nothing we subscribe to carries fds
        try:
            self._reader.feed(data)
        except MessageError as exc:
            self._lost(f"bad data from the bus: {exc}")
            return
        self._pump()

    def _pump(self) -> None:
        reader = self._reader
        try:
            while not self._closed:
                item = reader.next_message()
                if item is None:
                    return
                self._handle(item[0])
        except MessageError as exc:
            self._lost(f"bad message from the bus: {exc}")

    def _handle(self, data: bytes | bytearray) -> None:
        hdr = parse_header(data)
        if hdr.expects_reply:
            self._refuse(hdr.serial, hdr.sender)
            return
        if (
            hdr.message_type != SIGNAL
            or hdr.member != "NameOwnerChanged"
            or hdr.sender != BUS_NAME
            or hdr.signature != "sss"
        ):
            return  # NameAcquired for our own name, and the like
        little = hdr.little_endian
        try:
            name, pos = read_string(data, hdr.body_offset, little)
            old, pos = read_string(data, pos, little)
            new, _ = read_string(data, pos, little)
        except SignatureError as exc:
            log.warning("ignoring a malformed NameOwnerChanged: %s", exc)
            return
        self.tracker.name_owner_changed(name, old, new)

    def _refuse(self, serial: int, sender: str | None) -> None:
        """Anyone may call any connection: answer, rather than leave the caller waiting."""
        self._serial = self._serial % 0x7FFFFFFF + 1
        if self._serial <= _ADD_MATCH_SERIAL:
            self._serial = _ADD_MATCH_SERIAL + 1
        reply = error_reply(
            self._serial, serial, sender, UNKNOWN_METHOD,
            "this connection only listens to NameOwnerChanged",
        )
        if self._endpoint is not None:
            self._endpoint.send(reply)

    def _eof(self) -> None:
        self._lost("the bus closed the connection")

    def _lost(self, reason: str) -> None:
        if not self._closed:
            self.close()
            self.on_lost(reason)

    def close(self) -> None:
        """Leave the bus (the subscription goes with the connection)."""
        self._closed = True
        if self._endpoint is not None:
            self._endpoint.close()
        self._reader.close()
