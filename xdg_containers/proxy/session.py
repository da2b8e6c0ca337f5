"""The asyncio driver of one confined connection: sockets, connects, timers.

The session's states and every decision on it live in the sans-I/O core
(core/session.py); this driver gives it its two sockets as Endpoints (which
read, batch writes, pass fds and push back), makes the bus connection (a spare,
the anchor's answer, or our own connect) and runs the half-close timer.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import socket
import struct
import termios
from typing import TYPE_CHECKING, Protocol

from ..anchor.link import AnchorError, AnchorLink
from ..core.ports import MessageFilter as MessageFilter
from ..core.ports import SessionHost
from ..core.session import SessionCore
from ..wire.address import AddressError, parse_address
from .endpoint import ConnectError, Endpoint, connect_address, connect_unix_now
from .peercred import PeerCredentials

if TYPE_CHECKING:
    from .spare import SpareBusConnections

#: Send buffer asked for on our connections to the bus (see _bus_connected).
BUS_SNDBUF = 1024 * 1024
#: After a client half-closes, replies it still waits for are delivered for this long.
HALF_CLOSE_GRACE = 25.0


@functools.lru_cache(maxsize=64)
def _unix_sockaddr(bus_address: str) -> str | bytes | None:
    """The socket address of the bus's first entry when it is a unix socket, else None."""
    try:
        family, addr = parse_address(bus_address)[0].sockaddr()
    except AddressError:
        return None
    if family != socket.AF_UNIX or isinstance(addr, tuple):
        return None
    return addr


class DriverHost(SessionHost, Protocol):
    """What the driver needs of the server beyond what the core does: how to connect."""

    anchor: AnchorLink | None

    @property
    def spares(self) -> SpareBusConnections:
        """Ready bus connections, shared by all servers."""

    @property
    def bus_address(self) -> str:
        """Where this server's connections are proxied to."""


class Session(SessionCore):
    """A proxied connection from one confined client to the real bus."""

    __slots__ = ("_connect_task", "_timers", "loop")
    server: DriverHost
    creds: PeerCredentials
    _client: Endpoint

    def __init__(
        self,
        server: DriverHost,
        sock: socket.socket,
        creds: PeerCredentials,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Take ownership of an accepted, credential-checked socket."""
        self.loop = loop
        self._timers: list[asyncio.TimerHandle] = []
        self._connect_task: asyncio.Task[None] | None = None
        client = Endpoint(loop, sock, self._client_data, self._client_error, self._client_eof)
        client.on_filled = self._client_filled
        super().__init__(server, creds, client, os.getuid())

    def start(self) -> None:
        """Answer the client's opening lines, then connect to the bus.

        The client first: its AUTH is usually waiting already, and our own
        handshake with the bus is pipelined (BEGIN and Hello need not wait for
        the bus's OK), so the bus's side stays off the client's path.
        """
        self._client.start_reading()
        self.server.handshake_started(self)
        self._client.read_now()
        if self.closed:
            return
        if not self._connect_bus_now():
            self._connect_task = self.loop.create_task(self._connect_bus())

    # -- the core's hooks --------------------------------------------------------------

    def _stop_io(self) -> None:
        for t in self._timers:
            t.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()

    def _ended(self) -> None:
        if self._spare_addr is not None:
            self.server.spares.session_ended(self._spare_addr, self.server.anchor)

    def _start_grace(self) -> None:
        self._timers.append(self.loop.call_later(HALF_CLOSE_GRACE, self.close_when_flushed))

    def _client_unread(self) -> bool:
        try:
            waiting = struct.unpack(
                "i", fcntl.ioctl(self._client.fd, termios.FIONREAD, b"\0\0\0\0")
            )[0]
        except OSError:
            return False
        return bool(waiting)

    def _complete_creds(self) -> None:
        self.creds.complete(self._client.sock)

    def _bus_on_its_way(self) -> bool:
        return self._connect_task is not None

    def _reconnect(self) -> None:
        assert self._spare_addr is not None
        if not self._connect_fresh(self._spare_addr):
            self._connect_task = self.loop.create_task(self._connect_bus())

    # -- connecting to the bus -----------------------------------------------------------

    def _connect_bus_now(self) -> bool:
        """Take a spare bus connection, or ask for one; False: the connect task must.

        A server's connections are made by its anchor (SPEC 10), so that the bus
        records the anchor's pid, never ours; only a server with no anchor (this
        process is the anchor: the in-process drop-in) connects here itself.
        """
        addr = _unix_sockaddr(self.server.bus_address)
        if addr is None:
            return False
        self._spare_addr = addr
        spare = self.server.spares.take(addr, self.server.anchor)
        if spare is not None:
            sock, self._sasl_client = spare  # its AUTH went out already
            self._spare_replay = []
            self._bus_connected(sock, auth_sent=True)
            return True
        return self._connect_fresh(addr)

    def _connect_fresh(self, addr: str | bytes) -> bool:
        anchor = self.server.anchor
        if anchor is not None:
            self._connect_task = self.loop.create_task(self._connect_bus(anchor))
            return True
        try:
            sock = connect_unix_now(addr)
        except OSError:
            return False  # the caller falls back to the connect task
        self._bus_connected(sock)
        return True

    async def _connect_bus(self, anchor: AnchorLink | None = None) -> None:
        """A bus connection that takes waiting: the anchor's answer, or (no anchor, or a
        bus that is not a unix socket: no pid travels) our own connect."""
        try:
            if anchor is not None:
                sock = await anchor.connect()
            else:
                sock = await connect_address(self.loop, self.server.bus_address)
        except AnchorError as exc:
            self.close(f"no bus connection: {exc}")
            return
        except ConnectError as exc:
            self.close(str(exc))
            return
        if self.closed:
            sock.close()
            return
        self._bus_connected(sock)

    def _bus_connected(self, sock: socket.socket, auth_sent: bool = False) -> None:
        unix = sock.family == socket.AF_UNIX
        if unix:
            # The bus reads promptly: a larger send buffer lets a large message go in
            # one or two writes instead of a wake-up per 200 KiB. (Capped by the
            # kernel's wmem_max; the client side keeps the default, so a client that
            # does not read cannot make us hold more kernel memory.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUS_SNDBUF)
        bus = Endpoint(self.loop, sock, self._bus_data, self._bus_error, self._bus_eof)
        bus.on_filled = self._bus_filled
        bus.receive_fds = unix
        self._bus_attached(bus, auth_sent)
