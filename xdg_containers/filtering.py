"""Factory for the policy filter of servers created with Filter=true."""

from __future__ import annotations

from .proxy.basic_filter import BasicFilter
from .proxy.session import MessageFilter, Session
from .servers.server import FilterSettings


def make_policy_filter(session: Session, settings: FilterSettings) -> MessageFilter:
    """The filter for one session of a filtered server."""
    return BasicFilter(session.server.service_names)
