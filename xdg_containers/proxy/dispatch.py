"""An epoll selector that runs the proxy's socket callbacks straight from ``epoll_wait``.

asyncio turns every ready fd into a handle queued and run by ``_run_once``; for
proxied sockets, woken once per message in a round trip, that bookkeeping
costs about as much as forwarding the message. Sockets registered here with
``watch`` are dispatched inline, as soon as ``epoll_wait`` returns (proxied
sockets, listening sockets, the owner-change feed); all other fds (the
service's dbus-fast connection, signals) go through asyncio unchanged. Used by
``serve``; endpoints fall back to ``add_reader`` on any other loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
import selectors
import time
from collections.abc import Callable
from typing import Any

from ..compat import aio

log = logging.getLogger(__name__)

Callback = Callable[[], None]
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT


class DispatchingSelector(aio.EpollSelector):
    """EpollSelector plus fds whose callbacks run directly inside ``select``."""

    def __init__(self) -> None:
        """An empty selector; asyncio registers its fds as usual."""
        super().__init__()
        # fd -> [reader, writer, epoll mask, run after the others]
        self._direct: dict[int, list[Any]] = {}
        # The loop this selector serves (set by new_event_loop): lets select() keep
        # waiting while only proxy sockets wake it and they give asyncio nothing to do.
        self.loop: asyncio.BaseEventLoop | None = None

    def watch(
        self, fd: int, reader: Callback | None, writer: Callback | None, *, later: bool = False
    ) -> None:
        """Set (or with both None, drop) the callbacks run when ``fd`` is readable/writable.

        ``later``: in a batch of ready fds, run this one after the others (for work
        that is nobody's round trip, such as the owner-change feed).
        """
        mask = (_EPOLLIN if reader is not None else 0) | (_EPOLLOUT if writer is not None else 0)
        epoll = self.epoll
        entry = self._direct.get(fd)
        if not mask:
            if entry is not None:
                del self._direct[fd]
                try:
                    epoll.unregister(fd)
                except OSError:
                    pass  # closed already: the kernel dropped it
            return
        if entry is None:
            epoll.register(fd, mask)
            self._direct[fd] = [reader, writer, mask, later]
            return
        if entry[2] != mask:
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:
                epoll.register(fd, mask)  # the old socket was closed without unwatching
        entry[0] = reader
        entry[1] = writer
        entry[2] = mask
        entry[3] = later

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait like EpollSelector; run direct callbacks now, return asyncio's events.

        While only direct fds wake it, and their callbacks leave asyncio nothing
        to run (no ready handle, no new timer), it waits again until ``timeout``
        instead of returning: a full asyncio loop iteration per proxied message
        costs as much as forwarding it.
        """
        if timeout is None:
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:
            # Round up to the millisecond, as EpollSelector does, to wait at least timeout.
            wait = math.ceil(timeout * 1e3) * 1e-3
        direct = self._direct
        fd_to_key = self.fd_to_key
        poll = self.epoll.poll
        loop = self.loop
        ready: list[tuple[selectors.SelectorKey, int]] = []
        deadline = 0.0
        if loop is not None:
            timers = aio.scheduled_timers(loop)
            if wait > 0:
                deadline = time.monotonic() + wait
        while True:
            try:
                fd_event_list = poll(wait, max(len(fd_to_key) + len(direct), 1))
            except InterruptedError:
                return ready
            deferred: list[tuple[int, int, list[Any]]] | None = None
            for fd, event in fd_event_list:
                entry = direct.get(fd)
                if entry is not None:
                    if entry[3]:
                        if deferred is None:
                            deferred = []
                        deferred.append((fd, event, entry))
                        continue
                    if _dispatch(direct, fd, event, entry):
                        self._drop_failed(fd)
                    continue
                key = fd_to_key.get(fd)
                if key:
                    events = 0
                    if event & ~_EPOLLIN:
                        events |= selectors.EVENT_WRITE
                    if event & ~_EPOLLOUT:
                        events |= selectors.EVENT_READ
                    ready.append((key, events & key.events))
            if deferred is not None:
                for fd, event, entry in deferred:
                    if direct.get(fd) is entry and _dispatch(direct, fd, event, entry):
                        self._drop_failed(fd)
            if ready or not fd_event_list or loop is None or wait == 0:
                return ready
            if aio.has_new_work(loop, timers):
                return ready
            if wait > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return ready

    def _drop_failed(self, fd: int) -> None:
        """A callback of ``fd`` raised past its owner's own guard: stop watching it, or a
        level-triggered fd would fail again at every wake-up (a busy loop, a log storm)."""
        log.error("no longer watching fd %d after the error above", fd)
        self.watch(fd, None, None)

    def close(self) -> None:
        """Forget the direct fds too (their owners close the sockets)."""
        self._direct.clear()
        super().close()


def _dispatch(direct: dict[int, list[Any]], fd: int, event: int, entry: list[Any]) -> bool:
    """Run a direct fd's callbacks for ``event``, reading the bits as asyncio does
    (errors wake both sides); the writer only if the reader left the entry in place.
    True if a callback raised (logged here; the caller stops watching the fd)."""
    if event & ~_EPOLLOUT and entry[0] is not None:
        try:
            entry[0]()
        except Exception:
            _log_failure()
            return True
        if entry[1] is None or direct.get(fd) is not entry:
            return False
    if event & ~_EPOLLIN and entry[1] is not None:
        try:
            entry[1]()
        except Exception:
            _log_failure()
            return True
    return False


def _log_failure() -> None:
    # The owners guard their own callbacks (endpoint.py, the accept path): this is the
    # last resort, and the loop carries on as asyncio's does for a failing handle.
    log.exception("unexpected error in a proxy socket callback")


def watch_reads(
    loop: asyncio.AbstractEventLoop,
    direct: DispatchingSelector | None,
    fd: int,
    callback: Callback | None,
) -> None:
    """Run ``callback`` whenever ``fd`` is readable (None: no more): straight from
    ``epoll_wait`` through the loop's dispatching selector (``direct``), else as an
    ordinary asyncio reader."""
    if direct is not None:
        direct.watch(fd, callback, None)
    elif callback is not None:
        loop.add_reader(fd, callback)
    else:
        loop.remove_reader(fd)


def direct_selector(loop: asyncio.AbstractEventLoop) -> DispatchingSelector | None:
    """The loop's DispatchingSelector, or None when the loop uses another selector."""
    selector = aio.selector_of(loop)
    return selector if isinstance(selector, DispatchingSelector) else None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A selector event loop whose selector can dispatch proxy sockets directly."""
    selector = DispatchingSelector()
    loop = aio.selector_loop(selector)
    # Peeking at the loop's private fields is the fast path (compat/aio.py).
    selector.loop = loop if aio.loop_peekable(loop) else None  # type: ignore[assignment]
    return loop
