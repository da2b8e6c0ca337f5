"""Builds the filter of each connection of a filtered server, sharing one NameTracker."""

from __future__ import annotations

from .policy import Policy
from .policy.tracker import NameTracker
from .proxy.policy_filter import PolicyFilter
from .proxy.session import MessageFilter, Session
from .servers.server import FilterSettings


class PolicyFilterFactory:
    """Callable given to servers: one PolicyFilter per session, all on one tracker."""

    def __init__(self, tracker: NameTracker) -> None:
        """``tracker`` is fed by the service's own bus connection."""
        self.tracker = tracker
        self._filters: set[PolicyFilter] = set()
        tracker.on_unique_gone.append(self._unique_gone)

    def __call__(self, session: Session, settings: FilterSettings) -> MessageFilter:
        """A filter for ``session`` applying ``settings.policy``."""
        policy = settings.policy if settings.policy is not None else Policy({}, {}, {})
        flt = PolicyFilter(policy, self.tracker, session.server.service_names)
        return flt

    def _unique_gone(self, unique_name: str) -> None:
        # Per-session state about departed peers is pruned lazily by each filter
        # when it sees NameOwnerChanged; nothing global to do here.
        return None
