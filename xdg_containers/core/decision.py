"""What a filter may decide about one message, and the rules that hold even without Filter."""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from ..wire.header import METHOD_CALL, Header, Raw
from ..wire.matchrule import rule_requests_eavesdrop
from ..wire.types import SignatureError, read_string

BUS_NAME = "org.freedesktop.DBus"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"

#: Members of our own service a confined connection may never call (no nesting).
MANAGER_ONLY_MEMBERS = frozenset({"AddServer", "StopServer", "StopListening", "Stop", "SetPolicy"})
#: Bus-driver members never allowed through the proxy.
FORBIDDEN_DRIVER_MEMBERS = frozenset({"BecomeMonitor", "UpdateActivationEnvironment"})


class Verdict(enum.Enum):
    """The outcomes for one message."""

    PASS = 0
    DROP = 1  # silently (signals, unsolicited replies, no-reply calls)
    DENY = 2  # a call that gets an error reply
    REPLACE = 3  # forward other bytes instead (filtered bus-driver replies)
    ANSWER = 4  # a call answered by the proxy with a method return (hidden names)


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict plus what it needs: the error for DENY, the bytes for REPLACE."""

    verdict: Verdict
    error_name: str = ""
    text: str = ""
    data: bytes = b""
    reason: str = ""
    reply_signature: str = ""


def deny(error_name: str, text: str) -> Decision:
    """A denied call; the client gets ``error_name`` in order with its other replies."""
    return Decision(Verdict.DENY, error_name, text, reason=text)


def answer(signature: str, body: bytes, reason: str) -> Decision:
    """A call the proxy answers itself, as the bus would for a name nobody owns."""
    return Decision(Verdict.ANSWER, data=body, reason=reason, reply_signature=signature)


def replace(data: bytes) -> Decision:
    """Forward ``data`` instead of the message (a filtered bus-driver reply)."""
    return Decision(Verdict.REPLACE, data=data)


def drop(reason: str) -> Decision:
    """A message that vanishes (and is counted and logged)."""
    return Decision(Verdict.DROP, reason=reason)


#: Bound on the remembered passing calls of one connection (distinct call shapes).
MAX_CALL_PASSES = 256


def remember_pass(passes: dict[bytes, str], hdr: Header, data: Raw, dest: str) -> None:
    """Remember that calls with exactly this header-field array pass (see fastpath.py).

    Only for decisions that depend on nothing but those fields; only little-endian
    and fd-less calls, the only ones the fast path takes.
    """
    if not hdr.little_endian or hdr.unix_fds or not dest:
        return
    fields_len = int.from_bytes(data[12:16], "little")
    if len(passes) >= MAX_CALL_PASSES:
        passes.clear()
    passes[bytes(data[16 : 16 + fields_len])] = dest


def first_string_arg(hdr: Header, data: Raw) -> str | None:
    """The first body argument when it is a string, else None."""
    if not hdr.signature or hdr.signature[0] not in "so":
        return None
    try:
        return read_string(data, hdr.body_offset, hdr.little_endian)[0]
    except SignatureError:
        return None


def always_forbidden(
    hdr: Header, data: Raw, service_names: Collection[str]
) -> Decision | None:
    """Rules that hold for every confined connection, filtered or not.

    No nesting (manager methods of our own service), no owning or queueing for the
    service's own name, no monitors, no eavesdropping match rules, no changing the
    activation environment.
    """
    if hdr.message_type != METHOD_CALL:
        return None
    dest = hdr.destination
    if dest == BUS_NAME:
        member = hdr.member
        if member in FORBIDDEN_DRIVER_MEMBERS:
            return deny(ACCESS_DENIED, f"{member} is not allowed from inside a container")
        if member == "AddMatch":
            rule = first_string_arg(hdr, data)
            if rule is not None and rule_requests_eavesdrop(rule):
                return deny(ACCESS_DENIED, "eavesdropping is not allowed from inside a container")
        elif member == "RequestName":
            # Whatever the policy grants: a confined client waiting in the queue would
            # take the service's name (and every call to it) when the service restarts.
            name = first_string_arg(hdr, data)
            if name is not None and name in service_names:
                return deny(
                    ACCESS_DENIED,
                    f"the name {name} is reserved for the xdg-containers service; "
                    "a confined connection may not own or queue for it",
                )
        return None
    if dest is not None and dest in service_names and hdr.member in MANAGER_ONLY_MEMBERS:
        return deny(
            ACCESS_DENIED,
            f"{hdr.member} cannot be called from inside a container (no nesting)",
        )
    return None
