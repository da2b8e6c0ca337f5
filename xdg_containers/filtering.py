"""Builds the filter of each connection of a filtered server, sharing one NameTracker."""

from __future__ import annotations

import asyncio
import weakref

from .core.policy_filter import PolicyFilter
from .deadlines import DeadlineQueue
from .policy import Policy
from .policy.tracker import NameTracker
from .proxy.session import MessageFilter, Session
from .servers.server import FilterSettings

#: A departed peer is forgotten this long after the service saw it leave, so that
#: messages it sent just before leaving, still in a client's stream, keep its level.
FORGET_DELAY = 5.0


class PolicyFilterFactory:
    """Callable given to servers: one PolicyFilter per session, all on one tracker."""

    def __init__(self, tracker: NameTracker) -> None:
        """``tracker`` is fed by the owner-change feed (ownerfeed.py)."""
        self.tracker = tracker
        self._filters: weakref.WeakSet[PolicyFilter] = weakref.WeakSet()
        self._departed: DeadlineQueue[str] | None = None  # made on the first departure
        tracker.on_unique_gone.append(self._unique_gone)

    def __call__(self, session: Session, settings: FilterSettings) -> MessageFilter:
        """A filter for ``session`` applying ``settings.policy``."""
        policy = settings.policy if settings.policy is not None else Policy({}, {}, {})
        flt = PolicyFilter(policy, self.tracker, session.server.service_names)
        self._filters.add(flt)
        return flt

    def _unique_gone(self, unique_name: str) -> None:
        departed = self._departed
        if departed is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._forget(unique_name)
                return
            departed = self._departed = DeadlineQueue(loop, FORGET_DELAY, self._forget)
        departed.add(unique_name)

    def _forget(self, unique_name: str) -> None:
        for flt in list(self._filters):
            flt.forget_peer(unique_name)
