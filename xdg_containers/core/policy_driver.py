"""The filtered client's calls to the bus driver: what xdg-dbus-proxy lets through (pure).

Split from policy_filter.py: the driver's members each have their own rule (names that
must be visible, names the client may own, calls that reveal nothing).
"""

from __future__ import annotations

from typing import Protocol

from ..policy import Level, Policy
from ..wire.header import Header, Raw
from ..wire.names import MAX_NAME_LENGTH, is_too_long
from ..wire.names import shorten as _s
from ..wire.types import BodyWriter
from .decision import (
    ACCESS_DENIED,
    INVALID_ARGS,
    NAME_HAS_NO_OWNER,
    SERVICE_UNKNOWN,
    Decision,
    answer,
    deny,
    first_string_arg,
)

DRIVER_IFACE = "org.freedesktop.DBus"
PEER_IFACE = "org.freedesktop.DBus.Peer"
INTROSPECT_IFACE = "org.freedesktop.DBus.Introspectable"

#: Bus-driver calls that reveal nothing about other names.
_DRIVER_SAFE = frozenset({"Hello", "AddMatch", "RemoveMatch", "GetId"})
#: Bus-driver calls whose first argument names a peer that must be visible.
_DRIVER_NAME_QUERIES = frozenset(
    {
        "GetConnectionUnixUser",
        "GetConnectionUnixProcessID",
        "GetConnectionCredentials",
        "GetAdtAuditSessionData",
        "GetConnectionSELinuxSecurityContext",
        "GetConnectionAppArmorSecurityContext",
    }
)
_OWN_METHODS = frozenset({"RequestName", "ReleaseName", "ListQueuedOwners"})


#: What the bus answers a driver call naming an invalid (over-long) bus name with; the
#: proxy answers the same before any policy lookup, so filtered and unfiltered agree.
_INVALID_NAME_ERRORS = {
    "RequestName": INVALID_ARGS,
    "ReleaseName": INVALID_ARGS,
    "StartServiceByName": SERVICE_UNKNOWN,
}


def _invalid_name(member: str, name: str) -> Decision:
    """The answer to a driver call whose name argument is over 255 bytes (no valid name)."""
    why = (
        f"{member}: {_s(name, 64)} is not a valid bus name "
        f"({len(name.encode('utf-8', 'surrogatepass'))} bytes, more than {MAX_NAME_LENGTH})"
    )
    if member == "NameHasOwner":
        body = BodyWriter()
        body.uint32(0)
        return answer("b", body.bytes(), why)
    return deny(_INVALID_NAME_ERRORS.get(member, NAME_HAS_NO_OWNER), why)


class Levels(Protocol):
    """What the driver rules ask of the connection's filter."""

    policy: Policy

    def level_of(self, name: str) -> Level:
        """The client's level for a bus name."""


def driver_call(flt: Levels, hdr: Header, data: Raw) -> Decision | None:
    """Judge a call to the bus driver (org.freedesktop.DBus) for a filtered client."""
    iface = hdr.interface
    member = hdr.member or ""
    if iface == PEER_IFACE:
        if member in ("Ping", "GetMachineId"):
            return None
        return deny(ACCESS_DENIED, f"{iface}.{_s(member)} is not allowed")
    if iface == INTROSPECT_IFACE:
        if member == "Introspect":
            return None
        return deny(ACCESS_DENIED, f"{iface}.{_s(member)} is not allowed")
    if iface not in (None, DRIVER_IFACE):
        return deny(
            ACCESS_DENIED,
            f"{_s(iface)}.{_s(member)} on the bus driver is not allowed in a container",
        )
    if member in _DRIVER_SAFE:
        return None
    if member in ("ListNames", "ListActivatableNames"):
        return None  # the reply is filtered
    if member in ("NameHasOwner", "GetNameOwner") or member in _DRIVER_NAME_QUERIES:
        name = first_string_arg(hdr, data)
        if name is None:
            return None  # wrong signature: the bus answers InvalidArgs
        if is_too_long(name):
            return _invalid_name(member, name)
        if flt.level_of(name) >= Level.SEE:
            return None
        if member == "NameHasOwner":
            body = BodyWriter()
            body.uint32(0)
            return answer("b", body.bytes(), f"NameHasOwner({name}): hidden name")
        if member == "GetNameOwner":
            return deny(
                NAME_HAS_NO_OWNER,
                f"Could not get owner of name '{name}': no such name",
            )
        return deny(SERVICE_UNKNOWN, f"The name {name} is not visible from this container")
    if member in _OWN_METHODS or member == "StartServiceByName":
        name = first_string_arg(hdr, data)
        if name is None:
            return None
        if is_too_long(name):
            return _invalid_name(member, name)
        if member == "StartServiceByName":
            if flt.policy.start_service_allowed(name):
                return None
        elif flt.level_of(name) >= Level.OWN and not name.startswith(":"):
            return None
        if not flt.level_of(name) >= Level.SEE:
            return deny(SERVICE_UNKNOWN, f"The name {name} is not visible from this container")
        return deny(
            ACCESS_DENIED, f"{member}({name}) is not allowed by this container's policy"
        )
    return deny(
        ACCESS_DENIED,
        f"org.freedesktop.DBus.{_s(member)} is not allowed from inside a container",
    )
