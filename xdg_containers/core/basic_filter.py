"""The filter of a server without ``Filter``: identify only, plus the rules that always hold."""

from __future__ import annotations

from collections.abc import Collection

from ..wire.header import METHOD_CALL, SIGNAL, Header, Raw
from .decision import BUS_NAME, Decision, always_forbidden, drop, remember_pass


def service_signal(hdr: Header, service_names: Collection[str]) -> Decision | None:
    """Drop a signal of the Containers1 service itself toward a confined client (SPEC 12).

    Its signals (InterfacesAdded/Removed, PropertiesChanged of server objects,
    ServerRemoved) describe servers, nearly always other instances': a confined
    client gets none, filtered or not, and reads its own server's properties
    instead. ``service_names`` holds our unique name only for servers on our bus.
    """
    if hdr.sender in service_names:
        return drop(f"{hdr.interface}.{hdr.member} of the service is not for containers")
    return None


class BasicFilter:
    """Passes everything except nesting, monitoring, eavesdropping and environment changes."""

    def __init__(
        self, service_names: frozenset[str], call_passes: dict[bytes, str] | None = None
    ) -> None:
        """``service_names``: our own bus names, whose manager methods are off limits.

        ``call_passes``: header-field arrays of calls that passed -> their destination
        (fastpath.py); the decision depends on nothing else, so a server's unfiltered
        connections share one dict.
        """
        self.service_names = service_names
        self.call_passes: dict[bytes, str] = {} if call_passes is None else call_passes

    def from_client(self, hdr: Header, data: Raw) -> Decision | None:
        """Client -> bus: only the always-forbidden calls are refused."""
        dest = hdr.destination
        if dest is None:
            return None
        decision = always_forbidden(hdr, data, self.service_names)
        if decision is None and dest != BUS_NAME and dest not in self.service_names and (
            hdr.message_type == METHOD_CALL
        ):
            remember_pass(self.call_passes, hdr, data, dest)
        return decision

    def fast_reply(self, reply_serial: int, sender: str) -> None:
        """Nothing tracked."""

    def unexpected_reply(self, hdr: Header) -> Decision | None:
        """Unfiltered: a reply the client did not ask for passes too (the bus decides)."""
        return None

    def from_bus(self, hdr: Header, data: Raw) -> Decision | None:
        """Bus -> client: everything passes but the service's own signals."""
        if hdr.message_type == SIGNAL:
            return service_signal(hdr, self.service_names)
        return None

    def hello_sent(self) -> list[bytes]:
        """Nothing to set up."""
        return []

    def hello_done(self, unique_name: str) -> list[bytes]:
        """Nothing to set up."""
        return []
