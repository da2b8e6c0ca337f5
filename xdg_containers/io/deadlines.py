"""Keys that each expire a fixed delay after they were added, served by one timer.

Every connection has a handshake deadline and every departed peer a forget
delay. A TimerHandle each would cost a heap push and cancel per connection,
and every new timer ends the dispatching selector's inline wait (a full
asyncio iteration). With one delay for all, deadlines come in insertion order,
so an insertion-ordered dict and one timer for its oldest entry are enough.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)
#: Deadlines this close are due: asyncio may run a timer a little before its time.
_SLACK = 1e-3


class DeadlineQueue(Generic[K]):
    """``on_expired(key)`` runs about ``delay`` seconds after ``add(key)``, unless discarded."""

    __slots__ = ("_deadlines", "_loop", "_timer", "delay", "on_expired")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, on_expired: Callable[[K], None]
    ) -> None:
        """No timer exists until the first key is added."""
        self._loop = loop
        self.delay = delay
        self.on_expired = on_expired
        self._deadlines: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: K) -> None:
        """Start (or restart) ``key``'s delay."""
        deadlines = self._deadlines
        deadlines.pop(key, None)  # a restarted key moves to the end: order stays by deadline
        deadlines[key] = self._loop.time() + self.delay
        if self._timer is None:
            self._timer = self._loop.call_at(deadlines[key], self._fire)

    def discard(self, key: K) -> None:
        """Forget ``key``; its callback will not run. The timer stays until it fires."""
        self._deadlines.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def __len__(self) -> int:
        return len(self._deadlines)

    def close(self) -> None:
        """Drop every key and the timer."""
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        deadlines = self._deadlines
        now = self._loop.time() + _SLACK
        expired: list[K] = []
        for key, deadline in deadlines.items():
            if deadline > now:
                break
            expired.append(key)
        for key in expired:
            del deadlines[key]
        if deadlines:
            self._timer = self._loop.call_at(next(iter(deadlines.values())), self._fire)
        for key in expired:
            try:
                self.on_expired(key)
            except Exception:
                log.exception("error handling an expired deadline")
