"""asyncio internals the dispatching selector (proxy/dispatch.py) relies on, with public paths.

- ``EpollSelector``: the stdlib's ``selectors.EpollSelector`` keeps its epoll object and fd
  map private (``_selector``, ``_fd_to_key``); this one, built on the public
  ``selectors.BaseSelector`` and ``select.epoll``, has them as ``epoll`` and ``fd_to_key``.
- ``selector_loop``/``selector_of``: the loop's selector without ``loop._selector``.
- ``loop_peekable``/``scheduled_timers``/``has_new_work``: whether a wake-up left asyncio
  anything to run needs BaseEventLoop's private ``_ready``, ``_scheduled`` and ``_stopping``
  (CPython 3.11 to 3.13). Without them (another release, or ``XDG_CONTAINERS_ASYNCIO_PUBLIC=1``)
  the selector returns after every wake-up as asyncio's own does: correct, one loop
  iteration more per proxied message. tests/unit/test_compat_aio.py is the canary.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import select
import selectors
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Set to 1 to make the dispatching selector use the public path only.
PUBLIC_ENV = "XDG_CONTAINERS_ASYNCIO_PUBLIC"
#: The private BaseEventLoop fields the fast path reads, with the type each must have.
LOOP_FIELDS: dict[str, type] = {
    "_ready": collections.deque,
    "_scheduled": list,
    "_stopping": bool,
}

_EVENT_MASK = selectors.EVENT_READ | selectors.EVENT_WRITE
_loop_selectors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, selectors.BaseSelector] = (
    weakref.WeakKeyDictionary()
)


def _to_fd(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


class _KeyMap(Mapping[Any, selectors.SelectorKey]):
    """get_map()'s view: file objects (or fds) to keys."""

    def __init__(self, selector: EpollSelector) -> None:
        self._selector = selector

    def __len__(self) -> int:
        return len(self._selector.fd_to_key)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._selector.fd_to_key[self._selector.lookup(fileobj)]
        except (KeyError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._selector.fd_to_key)


class EpollSelector(selectors.BaseSelector):
    """selectors.EpollSelector from public parts, with its epoll object and fd map public."""

    def __init__(self) -> None:
        """A new epoll instance with nothing registered."""
        self.epoll = select.epoll()
        self.fd_to_key: dict[int, selectors.SelectorKey] = {}
        self._map: _KeyMap | None = _KeyMap(self)

    def lookup(self, fileobj: Any) -> int:
        """The fd of ``fileobj``; for a closed object still registered, the fd it had."""
        try:
            return _to_fd(fileobj)
        except ValueError:
            for key in self.fd_to_key.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise

    @staticmethod
    def _mask(events: int) -> int:
        return (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
            select.EPOLLOUT if events & selectors.EVENT_WRITE else 0
        )

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Watch ``fileobj`` for ``events``."""
        if not events or events & ~_EVENT_MASK:
            raise ValueError(f"Invalid events: {events!r}")
        key = selectors.SelectorKey(fileobj, self.lookup(fileobj), events, data)
        if key.fd in self.fd_to_key:
            raise KeyError(f"{fileobj!r} (FD {key.fd}) is already registered")
        self.epoll.register(key.fd, self._mask(events))
        self.fd_to_key[key.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        """Stop watching ``fileobj`` (closed already is fine)."""
        try:
            key = self.fd_to_key.pop(self.lookup(fileobj))
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        try:
            self.epoll.unregister(key.fd)
        except OSError:
            pass  # closed since it was registered
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Change the events or data of a registered ``fileobj``."""
        try:
            key = self.fd_to_key[self.lookup(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            if not events or events & ~_EVENT_MASK:
                raise ValueError(f"Invalid events: {events!r}")
            try:
                self.epoll.modify(key.fd, self._mask(events))
            except BaseException:
                self.fd_to_key.pop(key.fd, None)
                raise
        if events != key.events or data != key.data:
            key = key._replace(events=events, data=data)
            self.fd_to_key[key.fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait up to ``timeout`` seconds (None: forever) for registered events."""
        if timeout is None:
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:
            wait = math.ceil(timeout * 1e3) * 1e-3  # at least timeout, as epoll counts ms
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            fd_event_list = self.epoll.poll(wait, max(len(self.fd_to_key), 1))
        except InterruptedError:
            return ready
        for fd, event in fd_event_list:
            key = self.fd_to_key.get(fd)
            if key:
                events = (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                    selectors.EVENT_READ if event & ~select.EPOLLOUT else 0
                )
                ready.append((key, events & key.events))
        return ready

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        """The key of a registered ``fileobj``."""
        if self._map is None:
            raise RuntimeError("Selector is closed")
        return self._map[fileobj]

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        """Registered file objects to their keys (empty once closed)."""
        return self._map if self._map is not None else {}

    def fileno(self) -> int:
        """The epoll instance's fd."""
        return self.epoll.fileno()

    def close(self) -> None:
        """Close the epoll instance."""
        self.epoll.close()
        self.fd_to_key.clear()
        self._map = None


def selector_loop(selector: selectors.BaseSelector) -> asyncio.AbstractEventLoop:
    """A new SelectorEventLoop on ``selector``, remembered for ``selector_of``."""
    loop = asyncio.SelectorEventLoop(selector)
    _loop_selectors[loop] = selector
    return loop


def selector_of(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
    """The selector a loop made by ``selector_loop`` runs on (None for any other loop)."""
    return _loop_selectors.get(loop)


def loop_fields_problem(loop: asyncio.AbstractEventLoop) -> str | None:
    """None if ``loop`` has the private fields the fast path reads, else what is wrong."""
    for name, kind in LOOP_FIELDS.items():
        value = getattr(loop, name, None)
        if not isinstance(value, kind):
            return (
                f"asyncio.BaseEventLoop.{name} is {type(value).__name__}, not {kind.__name__}"
            )
    return None


def loop_peekable(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the dispatching selector may read ``loop``'s private fields (else it takes
    the public path); says which path at debug level, and why at warning level."""
    if os.environ.get(PUBLIC_ENV) == "1":
        log.debug("%s=1: the dispatching selector uses asyncio's public API only", PUBLIC_ENV)
        return False
    problem = loop_fields_problem(loop)
    if problem is not None:
        log.warning(
            "%s; the dispatching selector uses asyncio's public API only "
            "(one event-loop iteration more per proxied message)",
            problem,
        )
        return False
    return True


def scheduled_timers(loop: Any) -> int:
    """How many timers ``loop`` has scheduled (a loop_peekable loop only)."""
    return len(loop._scheduled)


def has_new_work(loop: Any, timers: int) -> bool:
    """Whether ``loop`` has callbacks to run, is stopping, or has other timers than
    ``timers`` (a loop_peekable loop only)."""
    return bool(loop._ready) or loop._stopping or len(loop._scheduled) != timers
