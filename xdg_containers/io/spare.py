"""A bus connection kept ready for the next confined client: connected, AUTH sent.

Connecting to the bus and sending our AUTH costs a new client's handshake
50-100 µs of cold Python and syscalls, right between its first answer and its
next line. A spare made while the service was idle takes that off the
client's path: the session takes it, sends BEGIN and the Hello behind the AUTH
already there (the bus reads them in order), and a new spare is made when the
session ends (or at the next housekeeping tick, for a long one).

A spare is an unauthenticated connection as far as the bus knows, so it is
replaced before the bus would drop it (dbus-daemon's default auth_timeout is
5 s) and only kept while clients connect: one per anchor and bus address, for at most
``DEMAND`` seconds after the last client. One that the bus closed anyway is
noticed before use (poll for a hang-up, then a peek) and a fresh connection is
made instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from typing import TYPE_CHECKING

from xdg_containers.io.endpoint import connect_unix_now
from xdg_containers.sasl.client import SaslClient

if TYPE_CHECKING:
    from xdg_containers.io.anchor_link import AnchorLink

log = logging.getLogger(__name__)

#: A spare older than this is not used (well under dbus-daemon's 5 s auth_timeout).
MAX_AGE = 3.0
#: Spares are kept for this long after the last client connected.
DEMAND = 30.0
#: Housekeeping period: replace old spares, make missing ones, drop unwanted ones.
TICK = 1.0
#: Spares are kept for the servers (anchor and bus) a client came to most recently,
#: at most this many: each is a half-open connection on the bus (dbus-daemon limits
#: those: max_incomplete_connections, 64 on the system bus) and a connect by its
#: anchor every few seconds, so a thousand busy servers must not each keep one.
MAX_KEYS = 8

SockAddr = str | bytes
#: Spares are kept per (anchor, bus socket): a spare must be made by the anchor of
#: the server whose client takes it (SPEC 10), or by this process when it is the
#: anchor itself (None: the in-process drop-in, unit tests).
SpareKey = tuple["AnchorLink | None", SockAddr]


class _Spare:
    __slots__ = ("made", "sasl", "sock")

    def __init__(self, sock: socket.socket, sasl: SaslClient, made: float) -> None:
        self.sock = sock
        self.sasl = sasl
        self.made = made


class SpareBusConnections:
    """At most one ready connection per anchor and unix bus address, made while idle.

    No timer is made per client (a new asyncio timer ends the dispatching
    selector's inline wait, a loop turn on the client's path): a new spare is
    made when a session ends, and one housekeeping tick per second, armed while
    clients come, covers long sessions and ageing spares.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Nothing is connected until a client asks (``take``)."""
        self._loop = loop
        self._spares: dict[SpareKey, _Spare] = {}
        self._demand_until: dict[SpareKey, float] = {}
        self._asked: set[SpareKey] = set()  # an anchor is making one
        self._tick: asyncio.TimerHandle | None = None
        # Buses that dropped a spare before MAX_AGE: they get none any more.
        self._disabled: set[SockAddr] = set()
        self.closed = False
        self.made = 0  # spares connected so far (tests, debugging)

    def take(
        self, addr: SockAddr, anchor: AnchorLink | None = None
    ) -> tuple[socket.socket, SaslClient] | None:
        """The spare for ``addr`` if there is a live one (its AUTH sent), else None.

        Either way a client has come: spares for ``addr`` are kept from now on
        until nobody connected for ``DEMAND`` seconds.
        """
        if self.closed or addr in self._disabled:
            return None
        key: SpareKey = (anchor, addr)
        now = self._loop.time()
        self._demand_until.pop(key, None)  # re-inserted last: the dict is LRU-ordered
        self._demand_until[key] = now + DEMAND
        if len(self._demand_until) > MAX_KEYS:
            self._evict(next(iter(self._demand_until)))
        if self._tick is None:
            self._tick = self._loop.call_later(TICK, self._housekeeping)
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        if now - spare.made > MAX_AGE:
            spare.sock.close()
            return None
        if not _alive(spare.sock):
            spare.sock.close()
            self._dropped(addr, now - spare.made)
            return None
        return spare.sock, spare.sasl

    def _dropped(self, addr: SockAddr, age: float) -> None:
        """The bus closed an idle spare ``age`` seconds old (a short auth_timeout; nothing
        but our AUTH went on it, so no client caused it): no more spares for that bus,
        since the next one could go just as a client takes it."""
        if addr not in self._disabled:
            self._disabled.add(addr)
            log.info(
                "the bus at %r closed an idle connection after %.1f s: not keeping spare "
                "connections to it", addr, age,
            )

    def session_ended(self, addr: SockAddr, anchor: AnchorLink | None = None) -> None:
        """A session on ``addr`` ended: a good moment for the next spare (nobody waits)."""
        if (anchor, addr) not in self._spares:
            self._refill((anchor, addr))

    def _evict(self, key: SpareKey) -> None:
        """No more spares for ``key`` until a client comes to it again."""
        del self._demand_until[key]
        spare = self._spares.pop(key, None)
        if spare is not None:
            spare.sock.close()

    def forget(self, anchor: AnchorLink) -> None:
        """The anchor's server ended: close its spares, make no more."""
        for key in [k for k in self._spares if k[0] is anchor]:
            self._spares.pop(key).sock.close()
        for key in [k for k in self._demand_until if k[0] is anchor]:
            del self._demand_until[key]

    def _refill(self, key: SpareKey) -> None:
        anchor, addr = key
        if self.closed or addr in self._disabled or key in self._asked:
            return
        if self._loop.time() >= self._demand_until.get(key, 0.0):
            return
        if anchor is not None:
            if anchor.closed:
                return
            self._asked.add(key)
            fut = anchor.connect()
            fut.add_done_callback(lambda f: self._anchor_answered(key, f))
            return
        try:
            sock = connect_unix_now(addr)
        except OSError as exc:
            log.debug("no spare bus connection: %s", exc)
            return
        self._store(key, sock)

    def _anchor_answered(self, key: SpareKey, fut: asyncio.Future[socket.socket]) -> None:
        self._asked.discard(key)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.debug("no spare bus connection from the anchor: %s", exc)
            return
        sock = fut.result()
        if self.closed or key in self._spares or key not in self._demand_until:
            sock.close()
            return
        self._store(key, sock)

    def _store(self, key: SpareKey, sock: socket.socket) -> None:
        sasl = SaslClient(os.getuid())
        try:
            sock.send(sasl.start())
        except OSError as exc:
            sock.close()
            log.debug("no spare bus connection: %s", exc)
            return
        self._spares[key] = _Spare(sock, sasl, self._loop.time())
        self.made += 1

    def _housekeeping(self) -> None:
        """Each second while clients come: no spare older than MAX_AGE at the next tick,
        one made where a long session took it, none kept once demand is over."""
        self._tick = None
        now = self._loop.time()
        for key, until in list(self._demand_until.items()):
            spare = self._spares.get(key)
            if now >= until:
                del self._demand_until[key]
                if spare is not None:
                    del self._spares[key]
                    spare.sock.close()
                continue
            if spare is not None and now - spare.made >= MAX_AGE - TICK:
                del self._spares[key]
                spare.sock.close()
                spare = None
            if spare is None:
                self._refill(key)
        if self._demand_until and not self.closed:
            self._tick = self._loop.call_later(TICK, self._housekeeping)

    def close(self) -> None:
        """Close every spare and stop making new ones."""
        self.closed = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for spare in self._spares.values():
            spare.sock.close()
        self._spares.clear()
        self._demand_until.clear()

    def __len__(self) -> int:
        return len(self._spares)


def _alive(sock: socket.socket) -> bool:
    """False if the bus closed the spare (even with its OK still unread) or refused us."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | _POLLRDHUP)
    events = poller.poll(0)
    if not events:
        return True  # no answer yet: the bus has not got to our AUTH
    if events[0][1] & (select.POLLHUP | select.POLLERR | _POLLRDHUP):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b"O"  # the start of OK, not a refusal
    except OSError:
        return False


_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


def spares_for(loop: asyncio.AbstractEventLoop) -> SpareBusConnections:
    """The loop's pool of spare bus connections (one per loop, shared by every server).

    Kept on the loop object itself: a registry keyed by loop would keep every loop
    (and its spares) alive through the pool's own reference to it.
    """
    pool = getattr(loop, _ATTR, None)
    if not isinstance(pool, SpareBusConnections):
        pool = SpareBusConnections(loop)
        try:
            setattr(loop, _ATTR, pool)
        except AttributeError:
            pass  # a loop type without a __dict__: each caller gets a pool of its own
    return pool


_ATTR = "_xdg_containers_spares"
