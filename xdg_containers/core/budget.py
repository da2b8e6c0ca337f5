"""The service-wide budget of bytes held in partial messages and queues (SPEC 12).

Each connection may hold ``max_pending_bytes_per_connection`` queued plus one
partial message of up to ``max_message_bytes``; 64 connections on each of many
servers could hold GiBs. The budget adds what every connection holds and, past
``max_buffered_bytes``, stops reading from the connections that hold the most
until the total is back under three quarters of it. Messages are never dropped
or reordered to stay under it: a paused connection waits; one whose partial
message does not advance is closed by the idle partial message timeout.

Cheap by construction: a connection reports only in whole CHUNKs (1 MiB), so
the ordinary connection, which never holds a MiB, never reports at all.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)

#: Holdings are counted in steps of this many bytes; under one step, not at all.
CHUNK = 1024 * 1024


class Holder(Protocol):
    """A connection that holds buffered bytes and can stop and resume reading."""

    def budget_resume(self) -> None:
        """Read again (the budget is back under its low mark)."""


class BufferBudget:
    """Adds the bytes held by every connection; pauses the biggest holders when over."""

    __slots__ = ("_held", "_paused", "limit", "over", "resume_below", "total")

    def __init__(self, limit: int) -> None:
        """``limit``: ``max_buffered_bytes``; reading resumes under 3/4 of it."""
        self.limit = limit
        self.resume_below = limit * 3 // 4
        self.total = 0
        self.over = False
        self._held: dict[Holder, int] = {}  # only holders of at least one CHUNK
        self._paused: set[Holder] = set()

    def held(self, holder: Holder) -> int:
        """What ``holder`` was last counted for (a multiple of CHUNK)."""
        return self._held.get(holder, 0)

    def set_held(self, holder: Holder, nbytes: int) -> bool:
        """``holder`` now holds ``nbytes``; return True if it should stop reading.

        A holder should stop when the budget is over, it holds at least a CHUNK,
        and some other holder is still reading (one always may, so that buffers
        can complete and free memory: no holder waits for another forever).
        """
        counted = nbytes - nbytes % CHUNK
        old = self._held.get(holder, 0)
        if counted != old:
            self.total += counted - old
            if counted:
                self._held[holder] = counted
            else:
                del self._held[holder]
                if holder in self._paused:
                    self._paused.discard(holder)  # holds nothing: nothing to stop
                    holder.budget_resume()
            if self.total > self.limit:
                self._go_over()
            elif self.over and self.total <= self.resume_below:
                self._resume_all()
            elif counted < old:
                self._ensure_progress()
        if not self.over or not counted or holder in self._paused:
            return False
        return self._others_reading(holder)

    def _others_reading(self, holder: Holder) -> bool:
        """Whether a holder other than ``holder`` is not paused (can make progress)."""
        reading = len(self._held) - len(self._paused)
        if holder in self._held and holder not in self._paused:
            reading -= 1
        return reading > 0

    def _go_over(self) -> None:
        if not self.over:
            self.over = True
            log.warning(
                "connections hold %d MiB, over max_buffered_bytes (%d MiB): reading "
                "paused for the biggest holders", self.total >> 20, self.limit >> 20,
            )

    def may_grow(self, holder: Holder, extra: int) -> bool:
        """``holder`` asks for ``extra`` bytes at once (a large message's whole buffer):
        True if it may take them now. If not, it should stop reading: the budget
        counts as over until the total is back under its low mark."""
        if self.total + extra <= self.limit or not self._others_reading(holder):
            return True
        self._go_over()
        return False

    def paused(self, holder: Holder) -> None:
        """``holder`` stopped reading for the budget (it called ``budget_pause``)."""
        self._paused.add(holder)

    def release(self, holder: Holder) -> None:
        """``holder`` is gone (closed): it holds nothing any more."""
        self._paused.discard(holder)
        self.set_held(holder, 0)

    def is_paused(self, holder: Holder) -> bool:
        """Whether ``holder`` is stopped by the budget."""
        return holder in self._paused

    def _resume_all(self) -> None:
        self.over = False
        log.info("connections hold %d MiB again: reading resumed", self.total >> 20)
        paused, self._paused = self._paused, set()
        for holder in paused:
            holder.budget_resume()

    def _ensure_progress(self) -> None:
        # Still over, and every holder left is paused: let the biggest go on.
        if self.over and self._paused and len(self._paused) >= len(self._held):
            biggest = max(self._paused, key=lambda h: self._held.get(h, 0))
            self._paused.discard(biggest)
            biggest.budget_resume()
