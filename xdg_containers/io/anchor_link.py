"""The service's end of a Connector: ask the anchor for bus connections (SPEC section 10).

Requests go one packet each and are answered in order; a request not answered
within ``REQUEST_TIMEOUT`` fails (that client loses its connection) and its late
answer, if one comes, is discarded. What the anchor sends back is checked: one
connected ``AF_UNIX`` ``SOCK_STREAM`` socket, nothing else. The Connector
closing (the anchor died or quit) is the server's end: ``on_lost`` runs once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
from collections.abc import Callable

from xdg_containers.anchor.program import received_fds
from xdg_containers.io.dispatch import direct_selector, watch_reads
from xdg_containers.wire.address import escape_value

log = logging.getLogger(__name__)

#: Seconds an anchor may take to answer one request.
REQUEST_TIMEOUT = 5.0
_MAX_FDS = 8
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS * 4)


class AnchorError(Exception):
    """The anchor could not give a usable bus connection; the text says why."""


def request_address(sockaddr: str | bytes) -> str:
    """The protocol's request: ``unix:path=...`` or ``unix:abstract=...``, escaped."""
    if isinstance(sockaddr, bytes):
        name = os.fsdecode(sockaddr[1:] if sockaddr.startswith(b"\0") else sockaddr)
        return "unix:abstract=" + escape_value(name)
    return "unix:path=" + escape_value(sockaddr)


@functools.lru_cache(maxsize=64)
def anchor_request(bus_address: str) -> str:
    """What to ask an anchor for: the bus address's unix entries, in order (the anchor
    uses the first that answers, as a client would)."""
    return ";".join(e for e in bus_address.split(";") if e.startswith("unix:"))


def check_upstream_socket(fd: int) -> socket.socket:
    """Wrap ``fd`` if it is a connected unix stream socket; else close it and raise."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise AnchorError(f"the anchor sent an fd that is not a socket ({exc.strerror})") from exc
    try:
        family = sock.family
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
            raise AnchorError("the anchor sent a socket that is not AF_UNIX SOCK_STREAM")
        if listening:
            raise AnchorError("the anchor sent a listening socket, not a connected one")
        try:
            sock.getpeername()
        except OSError as exc:
            raise AnchorError("the anchor sent a socket that is not connected") from exc
    except AnchorError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise AnchorError(f"cannot inspect the anchor's socket: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def parse_answer(data: bytes, fds: list[int], truncated: bool) -> socket.socket:
    """One answer packet -> the checked socket, or AnchorError (every fd closed)."""
    if truncated:
        for fd in fds:
            os.close(fd)
        raise AnchorError("the anchor sent more fds than one answer may carry")
    if data[:1] == b"\x00" and len(fds) == 1:
        return check_upstream_socket(fds[0])
    for fd in fds:
        os.close(fd)
    if data[:1] == b"\x00":
        raise AnchorError(f"the anchor answered success with {len(fds)} fds instead of one")
    if data[:1] == b"\x01":
        text = data[1:513].decode("utf-8", "replace")
        raise AnchorError(f"the anchor could not connect: {text}")
    raise AnchorError(f"the anchor sent a malformed answer ({len(data)} bytes)")


def _unattached(reason: str) -> None:
    """``on_lost`` of an anchor no server has taken yet (its AddServer is failing)."""
    log.info("an anchor ended before its server started: %s", reason)


def _relay(to: asyncio.Future[socket.socket], got: asyncio.Future[socket.socket]) -> None:
    """Settle ``to`` as ``got`` was (a request passed on to another anchor)."""
    if to.done():
        if not got.cancelled() and got.exception() is None:
            got.result().close()
        return
    if got.cancelled():
        to.cancel()
    elif (exc := got.exception()) is not None:
        to.set_exception(exc)
    else:
        to.set_result(got.result())


class AnchorLink:
    """One Connector socket: ordered requests, checked answers, one ``on_lost``."""

    # One per server, idle nearly always: kept small (slots, no queue until a request).
    __slots__ = (
        "_direct", "_pending", "_stale", "bus_request", "closed", "loop", "on_lost", "pid", "sock"
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_lost: Callable[[str], None] = _unattached,
        pid: int | None = None,
    ) -> None:
        """Take ownership of the service's end of a connected SOCK_SEQPACKET socket."""
        self.loop = loop
        self.sock = sock
        self.pid = pid  # the anchor's pid when we started it (logs, tests)
        self.on_lost = on_lost
        #: What ``connect`` asks for: its server's bus (``anchor_request``), set when a
        #: server takes the anchor.
        self.bus_request = ""
        self._pending: collections.deque[asyncio.Future[socket.socket]] | None = None
        self._stale = 0  # answers still owed to requests that timed out
        self.closed = False
        sock.setblocking(False)
        # Watched like the proxied sockets when the loop allows it (no asyncio handle
        # per server).
        self._direct = direct_selector(loop)
        watch_reads(loop, self._direct, sock.fileno(), self._readable)

    @property
    def busy(self) -> bool:
        """Whether a request is waiting for its answer."""
        return bool(self._pending)

    def connect(self) -> asyncio.Future[socket.socket]:
        """A new connection to its server's bus (see ``request``)."""
        return self.request(self.bus_request)

    def request(self, address: str) -> asyncio.Future[socket.socket]:
        """Ask for a new connection to ``address``; the future fails with AnchorError."""
        fut: asyncio.Future[socket.socket] = self.loop.create_future()
        if self.closed:
            fut.set_exception(AnchorError("the anchor is gone"))
            return fut
        try:
            self.sock.send(address.encode("utf-8"))
        except OSError as exc:
            fut.set_exception(AnchorError(f"cannot reach the anchor: {exc.strerror}"))
            self._lost(f"cannot send to it: {exc.strerror}")
            return fut
        if self._pending is None:
            self._pending = collections.deque()
        self._pending.append(fut)
        timer = self.loop.call_later(REQUEST_TIMEOUT, self._timed_out, fut)
        fut.add_done_callback(lambda _f: timer.cancel())
        return fut

    def _timed_out(self, fut: asyncio.Future[socket.socket]) -> None:
        if fut.done() or self._pending is None:
            return  # answered, or passed on to another anchor (pass_pending_to)
        try:
            self._pending.remove(fut)
        except ValueError:
            return
        self._stale += 1
        fut.set_exception(AnchorError(f"the anchor did not answer within {REQUEST_TIMEOUT:g} s"))

    def _readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(4096, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"read failed: {exc.strerror}")
            return
        fds = received_fds(anc)
        if not data and not fds:
            self._lost("it closed the connector")
            return
        if self._stale:
            self._stale -= 1
            for fd in fds:
                os.close(fd)
            return
        if not self._pending:
            for fd in fds:
                os.close(fd)
            log.warning("anchor %s sent an answer nobody asked for; ignored", self.pid or "")
            return
        fut = self._pending.popleft()
        try:
            sock = parse_answer(data, fds, bool(flags & socket.MSG_CTRUNC))
        except AnchorError as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():
            sock.close()
        else:
            fut.set_result(sock)

    def pass_pending_to(self, other: AnchorLink) -> None:
        """The server has a new anchor (its launcher registered again): what is waiting
        here is asked of ``other`` instead, so no client waiting for a bus connection is
        failed by the swap."""
        pending, self._pending = self._pending or collections.deque(), None
        for fut in pending:
            if not fut.done():
                other.request(self.bus_request).add_done_callback(
                    functools.partial(_relay, fut))

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.close(AnchorError(f"the anchor is gone ({reason})"))
        self.on_lost(reason)

    def close(self, exc: AnchorError | None = None) -> None:
        """Close the Connector (the anchor exits on EOF) and fail what is pending."""
        if self.closed:
            return
        self.closed = True
        watch_reads(self.loop, self._direct, self.sock.fileno(), None)
        self.sock.close()
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc or AnchorError("the server ended"))
