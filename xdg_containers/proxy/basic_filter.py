"""The filter of a server without ``Filter``: identify only, plus the rules that always hold."""

from __future__ import annotations

from ..wire.header import Header, Raw
from .decision import Decision, always_forbidden


class BasicFilter:
    """Passes everything except nesting, monitoring, eavesdropping and environment changes."""

    def __init__(self, service_names: frozenset[str]) -> None:
        """``service_names``: our own bus names, whose manager methods are off limits."""
        self.service_names = service_names

    def from_client(self, hdr: Header, data: Raw) -> Decision | None:
        """Client -> bus: only the always-forbidden calls are refused."""
        if hdr.destination is None:
            return None
        return always_forbidden(hdr, data, self.service_names)

    def from_bus(self, hdr: Header, data: Raw) -> Decision | None:
        """Bus -> client: everything passes."""
        return None

    def hello_done(self, unique_name: str) -> list[bytes]:
        """Nothing to set up."""
        return []

    def reply_delivered(self, serial: int) -> None:
        """Nothing tracked."""
